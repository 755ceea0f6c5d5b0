"""Bad configurations are rejected before any process group exists, with one message naming the key.

Table-driven through ``validate`` (and ``Config.from_dict`` for unknown keys); a few go through the
real CLI, which must exit 2 with a single line on stderr and start no worker.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, small_config

from fdg_dist.config import Config, ConfigError, validate


def _set(**overrides: object) -> Callable[[Config], None]:
    def apply(cfg: Config) -> None:
        for key, value in overrides.items():
            if "." in key:
                section, name = key.split(".")
                setattr(getattr(cfg, section), name, value)
            else:
                setattr(cfg, key, value)
    return apply


# (id, change to a valid config, world size the launcher started, key the message must name)
BAD = [
    ("k<1", _set(**{"pipeline.k": 0}), None, "pipeline.k"),
    ("k>blocks", _set(**{"pipeline.k": 8}), None, "pipeline.k"),  # tiny has 7 blocks
    ("world!=k", _set(**{"pipeline.k": 3}), 2, "pipeline.k"),
    ("beta=0", _set(**{"method.beta": 0.0}), None, "method.beta"),
    ("beta=1.5", _set(**{"method.beta": 1.5}), None, "method.beta"),
    ("beta-with-ddg", _set(**{"method.name": "ddg", "method.beta": 0.5}), None, "method.beta"),
    ("model", _set(**{"model.name": "resnet21"}), None, "model.name"),
    ("data", _set(**{"data.name": "mnist"}), None, "data.name"),
    ("method", _set(**{"method.name": "pipedream"}), None, "method.name"),
    ("optim", _set(**{"optim.name": "lamb"}), None, "optim.name"),
    ("sched", _set(**{"sched.name": "linear"}), None, "sched.name"),
    ("split-not-increasing", _set(**{"pipeline.k": 3, "pipeline.split": [4, 2]}), None, "pipeline.split"),
    ("split-out-of-range", _set(**{"pipeline.k": 2, "pipeline.split": [9]}), None, "pipeline.split"),
    ("split-zero", _set(**{"pipeline.k": 2, "pipeline.split": [0]}), None, "pipeline.split"),
    ("split-length", _set(**{"pipeline.k": 3, "pipeline.split": [2]}), None, "pipeline.split"),
    ("split-not-a-list", _set(**{"pipeline.k": 2, "pipeline.split": "half"}), None, "pipeline.split"),
    ("cost-unknown", _set(**{"pipeline.cost": "params"}), None, "pipeline.cost"),
    ("imagefolder-root", _set(**{"data.name": "imagefolder", "data.root": "/nonexistent/imagenet"}), None, "data.root"),
    ("batch=0", _set(**{"trainer.batch_size": 0}), None, "trainer.batch_size"),
    ("batch%replicas", _set(**{"pipeline.replicas": 3}), 6, "trainer.batch_size"),  # 16 over 3 replicas
    ("fp16", _set(**{"trainer.precision": "fp16"}), None, "trainer.precision"),
    ("channels-last-unknown", _set(**{"trainer.channels_last": "nhwc"}), None, "trainer.channels_last"),
    ("backend", _set(**{"dist.backend": "mpi"}), None, "dist.backend"),
    ("timeout=0", _set(**{"dist.timeout_s": 0}), None, "dist.timeout_s"),
    ("max_steps=0", _set(**{"trainer.max_steps": 0}), None, "trainer.max_steps"),
    ("accum_steps=0", _set(**{"method.name": "adl", "method.accum_steps": 0}), None, "method.accum_steps"),
    ("keep=0", _set(**{"checkpoint.keep": 0}), None, "checkpoint.keep"),
    ("resume-path", _set(resume="/nonexistent/run"), None, "resume"),
    ("nan_policy", _set(**{"trainer.nan_policy": "ignore"}), None, "trainer.nan_policy"),
    ("epochs=0", _set(**{"trainer.epochs": 0}), None, "trainer.epochs"),
]


def test_the_base_config_is_valid() -> None:
    validate(small_config(), world_size=2)


@pytest.mark.parametrize("change,world,key", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_config_is_rejected_naming_the_key(change: Callable[[Config], None], world: int | None, key: str) -> None:
    cfg = small_config()
    change(cfg)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    message = str(err.value)
    assert message.startswith(f"{key}: "), message
    assert "\n" not in message


def test_resume_must_be_a_directory(tmp_path: Path) -> None:
    cfg = small_config()
    (tmp_path / "module0-replica0.pt").write_bytes(b"")
    cfg.resume = str(tmp_path / "module0-replica0.pt")
    with pytest.raises(ConfigError, match="^resume: .*checkpoint directory"):
        validate(cfg)


@pytest.mark.parametrize("raw,named", [
    ({"trainer": {"epoch": 3}}, "trainer.epoch: unknown key"),
    ({"bogus": 1}, "unknown config key(s) ['bogus']"),
])
def test_unknown_keys_are_rejected(raw: dict, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        Config.from_dict(raw)
    assert named in str(err.value)


CLI_BASE = ["model=tiny", "data=synthetic", "logging.tensorboard=false"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("override,key", [
    ("pipeline.k=0", "pipeline.k"),
    ("method.beta=1.5", "method.beta"),
    ("+trainer.bogus=1", "trainer.bogus"),
    ("resume=/nonexistent/run", "resume"),
])
def test_cli_exits_2_with_one_line_before_starting_workers(override: str, key: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fdg_dist.train", *CLI_BASE, override, f"hydra.run.dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fdg-train: invalid configuration: {key}"), proc.stderr
    assert not (run_dir / "train.log").exists()  # no worker started, no process group


@pytest.mark.timeout(60)
def test_torchrun_world_size_mismatch_is_rejected_by_every_rank(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "fdg_dist.train", *CLI_BASE, "pipeline.k=3", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=50)
    assert proc.returncode != 0
    assert proc.stderr.count("invalid configuration: pipeline.k: the launcher started 2 processes") == 2, proc.stderr
    assert not (tmp_path / "run" / "train.log").exists()
