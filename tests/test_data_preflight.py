"""A CIFAR root without its files fails in one line before any worker starts (issue 16), and a download
without network says what to do instead of printing urllib's traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import pytest
from conftest import REPO

from fdg_dist import data
from fdg_dist.config import DataConfig


@pytest.mark.timeout(60)
def test_missing_cifar_files_fail_in_one_line_before_any_worker_starts(tmp_path: Path) -> None:
    """README's first command with an empty data.root: exit 2, one line naming data.root and the folder."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fdg_dist.train", "model=tiny", "data=cifar10",
                           f"data.root={tmp_path / 'data'}", "pipeline.k=2", f"hydra.run.dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fdg-train: data.root: ") and "has no cifar-10-batches-py/" in lines[0]
    assert "data.download=true" in lines[0] and "data=imagefolder" in lines[0]
    assert not (run_dir / "train.log").exists()  # no worker started


def test_download_without_network_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(datasets, "CIFAR10", offline)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), download=True)
    with pytest.raises(data.DataUnavailable) as err:
        data.check_available(cfg)
    message = str(err.value)
    assert message.startswith("data.download: no network: put cifar-10-batches-py in data.root or use data=imagefolder")
    assert "Name or service not known" in message and "\n" not in message
    data.check_available(cfg, download=False)  # under torchrun module 0 fetches later: nothing to check yet


def test_present_cifar_folder_and_other_datasets_pass(tmp_path: Path) -> None:
    (tmp_path / "cifar-100-python").mkdir()
    data.check_available(DataConfig(name="cifar100", root=str(tmp_path)))
    data.check_available(DataConfig(name="synthetic"))
    with pytest.raises(data.DataUnavailable, match="cifar-10-batches-py"):
        data.check_available(DataConfig(name="cifar10", root=str(tmp_path)))
