"""``fdg-report`` on a real two-run sweep (β = 1 and β = 0.5, K = 2): the table equals result.json, each plot
draws the runs' numbers and its PNG is that drawing."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.image import imread
from test_metrics import trained_run

from fdg_dist import report
from fdg_dist.report import load_run, main

PNGS = ["test_error_vs_epoch.png", "test_error_vs_beta.png", "time_breakdown.png", "samples_per_s_vs_k.png"]
SERIES = dict(zip(PNGS, [2, 1, 4, 2], strict=True))  # runs, β lines, time parts, β lines: colours C0, C1, ...
TAB10 = [tuple(round(255 * c) for c in rgb) for rgb in plt.get_cmap("tab10").colors]  # the series' colours


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
def test_report_table_equals_results_and_plots_show_the_runs(sweep: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    figures: list[plt.Figure] = []
    close = plt.close
    monkeypatch.setattr(report.plt, "close", figures.append)  # keep each figure to look at what it drew
    main([str(sweep), "--out", str(out)])
    printed = capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert text in printed
    runs = [load_run(sweep / str(job)) for job in (0, 1)]  # β = 1, 0.5: the order of the legend
    want = {f"fdg β={r.result['beta']:g} K=2": f"{100 * r.result['final_test_error']:.2f}" for r in runs}
    assert _table(text) == want and len(want) == 2

    epochs, betas, times, rates = (fig.axes for fig in figures)
    assert [line.get_ydata().tolist() for line in epochs[0].lines] == [
        [100 * e["test_error"] for e in r.epochs] for r in runs]
    medians = betas[0].containers[0].lines[0]  # the errorbar's line: median test error at β = 0.5 and 1
    assert medians.get_ydata().tolist() == [100 * r.result["final_test_error"] for r in runs[::-1]]
    for ax, r in zip(times, runs, strict=True):  # stacked bars: compute, waits, other of modules 0 and 1
        heights = [[bar.get_height() for bar in bars] for bars in ax.containers]
        assert heights == [[t[key] for t in r.timing] for key, _ in report.TIME_PARTS]
    assert [line.get_ydata().tolist() for line in rates[0].lines] == [[r.samples_per_s] for r in runs[::-1]]

    for name, fig in zip(PNGS, figures, strict=True):  # the files are these figures, drawn
        png = imread(out / name)
        again = io.BytesIO()
        fig.savefig(again, dpi=120, format="png")
        again.seek(0)
        drawn = imread(again)
        assert png.shape == drawn.shape and (png == drawn).all(), name
        colours = {tuple(c) for c in (255 * png[..., :3]).round().astype(int).reshape(-1, 3).tolist()}
        assert set(TAB10[:SERIES[name]]) <= colours, f"{name}: a series' colour is missing"
        close(fig)


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
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {runs / 'report' / 'report.md'} and 4 plots beside it"
    shutil.rmtree(runs / "report")
    main([str(runs / "0"), str(runs / "1")])  # several folders: their common folder
    assert (runs / "report" / "report.md").is_file() and not list(cwd.iterdir())


def test_no_runs_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no run"):
        main([str(tmp_path)])
