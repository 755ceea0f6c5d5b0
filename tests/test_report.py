"""``fdg-report`` on a real two-run sweep (β = 1 and β = 0.5, K = 2): the table equals result.json, PNGs exist."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_metrics import trained_run

from fdg_dist.report import main

PNGS = ["test_error_vs_epoch.png", "test_error_vs_beta.png", "time_breakdown.png", "samples_per_s_vs_k.png"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sweep dir like Hydra's multirun: numbered job dirs, each a run (trained once per session)."""
    base = tmp_path_factory.getbasetemp()
    root = base / "sweep"
    for job, beta in enumerate((1.0, 0.5)):
        shutil.copytree(trained_run(base, beta), root / str(job), dirs_exist_ok=True)
    return root


def _table(text: str) -> dict[str, str]:
    """Column header → cell of the one model row."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    header, _, (model, *cells) = rows
    assert model == "tiny"
    return dict(zip(header[1:], cells, strict=True))


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_report_table_equals_results_and_plots_exist(sweep: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    main([str(sweep), "--out", str(out)])
    printed = capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert text in printed
    want = {}
    for job in sweep.iterdir():
        result = json.loads((job / "result.json").read_text())
        want[f"fdg β={result['beta']:g} K=2"] = f"{100 * result['final_test_error']:.2f}"
    assert _table(text) == want and len(want) == 2
    for name in PNGS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_report_goes_inside_the_runs_folder_by_default(sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Not into the current directory (inside a clone: an untracked folder); the last line says where."""
    runs = shutil.copytree(sweep, tmp_path / "sweep").resolve()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    main([str(runs)])
    assert (runs / "report" / "report.md").is_file() and not list(cwd.iterdir())
    out = runs / "report"
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {out / 'report.md'}, {out / 'by_k.md'} and the plots beside them"
    shutil.rmtree(runs / "report")
    main([str(runs / "0"), str(runs / "1")])  # several folders: their common folder
    assert (runs / "report" / "report.md").is_file() and not list(cwd.iterdir())


def test_no_runs_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no run"):
        main([str(tmp_path)])


def _fake_run(root: Path, name: str, *, k: int, beta: float, corrector: str, seed: int, error: float,
              cosines: dict[int, float] | None = None) -> None:
    """A finished run's files as fdg-train writes them; ``cosines`` adds staleness tags for those modules."""
    from torch.utils.tensorboard import SummaryWriter

    run = root / name
    run.mkdir(parents=True)
    result = {"final_test_error": error, "best_test_error": error, "k": k, "beta": beta, "method": "fdg",
              "corrector": corrector, "model": "resnet20", "data": "imagefolder", "seed": seed}
    (run / "result.json").write_text(json.dumps(result))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "test_error": error, "samples_per_s": 10.0}) + "\n")
    for module, cosine in (cosines or {}).items():
        with SummaryWriter(str(run / "tb" / f"module{module}")) as w:
            for step, c in ((1, 1.0), (11, 2 * cosine - 1.0)):  # mean = cosine
                for tag, value in (("delay_steps", 2 - module), ("weight_distance", 0.01 * (2 - module)),
                                   ("local_cosine", c), ("local_norm_ratio", 1.0)):
                    w.add_scalar(f"staleness/{tag}", value, step)


def test_by_k_table_and_staleness_per_module(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _fake_run(sweep, "bp0", k=1, beta=1.0, corrector="none", seed=0, error=0.30)
    _fake_run(sweep, "bp1", k=1, beta=1.0, corrector="none", seed=1, error=0.32)
    _fake_run(sweep, "fdg0", k=2, beta=1.0, corrector="none", seed=0, error=0.34, cosines={0: 0.9, 1: 1.0})
    _fake_run(sweep, "fdg1", k=2, beta=1.0, corrector="none", seed=1, error=0.36, cosines={0: 0.8, 1: 1.0})
    _fake_run(sweep, "pred0", k=2, beta=1.0, corrector="predict", seed=0, error=0.31, cosines={0: 0.99, 1: 1.0})
    out = tmp_path / "report"
    main([str(sweep), "--out", str(out)])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")[1:]]
            for line in (out / "by_k.md").read_text().splitlines() if line.startswith("| ") and "setting" not in line}
    assert rows["BP (K=1)"] == ["31.00 [30.00, 32.00]", "–"]
    assert rows["fdg β=1"] == ["–", "35.00 [34.00, 36.00] (+4.00)"]
    assert rows["fdg β=1 +predict"] == ["–", "31.00 [31.00] (+0.00)"]
    stale = (out / "staleness.md").read_text()
    assert "| fdg β=1 K=2 | 0.850 / 0.0200 / 2.0 | 1.000 / 0.0100 / 1.0 |" in stale  # median of the two seeds
    assert "| fdg β=1 K=2 +predict | 0.990 / 0.0200 / 2.0 |" in stale
    assert (out / "staleness.png").read_bytes().startswith(PNG_MAGIC)
