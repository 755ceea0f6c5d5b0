"""``fdg-train``: compose the Hydra config once, validate it, then run as one worker or launch K.

Under torchrun every process arrives here and becomes one module.  Without torchrun the program is
its own launcher: it starts ``world_size`` local workers through torch's elastic launch API, passing
them the resolved config and the one run directory, so Hydra multirun sweeps (``-m``) work with each
job getting its own processes.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import uuid
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fdg_dist import worker
from fdg_dist.config import Config, ConfigError, validate

CONF_DIR = os.environ.get("FDG_CONF_DIR", str(Path(__file__).resolve().parents[2] / "conf"))
log = logging.getLogger("fdg_dist")


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def _run_id() -> str:
    """One run directory name for all ranks: torchrun's run id (shared, stable across restarts) or a timestamp."""
    if _under_torchrun():
        return f"torchrun-{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}"
    return datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


def _output_subdir() -> str | None:
    """Only rank 0 writes ``.hydra/`` under torchrun; the others would race on the same files."""
    return ".hydra" if os.environ.get("RANK", "0") == "0" else None


OmegaConf.register_new_resolver("fdg_run_id", _run_id, replace=True)
OmegaConf.register_new_resolver("fdg_output_subdir", _output_subdir, replace=True)


def config_from_hydra(raw: DictConfig) -> Config:
    """Resolve everything but Hydra's own node (it only resolves inside a running Hydra job)."""
    ours = OmegaConf.masked_copy(raw, [key for key in raw if key != "hydra"])
    return Config.from_dict(OmegaConf.to_container(ours, resolve=True))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(cfg: Config, run_dir: Path) -> dict | None:
    """Start the run's workers on this machine with torch's elastic agent (rendezvous on loopback)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # Restarts with a shared rendezvous store fail half the time on gloo (pytorch #135712).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.world_size, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}",
                          max_restarts=cfg.dist.max_restarts, monitor_interval=0.2, start_method="spawn")
    results = elastic_launch(config, worker.run)(cfg.to_dict(), str(run_dir))
    return next((r for r in results.values() if r is not None), None)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def _main(raw: DictConfig) -> float | None:
    try:
        cfg = config_from_hydra(raw)
        world = int(os.environ["WORLD_SIZE"]) if _under_torchrun() else None
        validate(cfg, world_size=world)
    except ConfigError as e:
        print(f"fdg-train: invalid configuration: {e}", file=sys.stderr)
        sys.exit(2)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    result = worker.run(cfg.to_dict(), str(run_dir)) if _under_torchrun() else launch_local(cfg, run_dir)
    return None if result is None else result.get("final_test_error")


def main() -> None:
    # As under ``python -m fdg_dist.train``: modules in the working directory import (model._target_=my_model.fn);
    # the spawned workers inherit the path.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    _main()
