"""``fdg-report`` on a real two-run sweep (β = 1 and β = 0.5, K = 2): the table equals result.json, each plot
draws the runs' numbers and its PNG is that drawing."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.image import imread
from test_metrics import trained_run

from fdg_dist.observe import report, report_staleness
from fdg_dist.observe.report import load_run, main

PNGS = ["test_error_vs_epoch.png", "test_error_vs_beta.png", "time_breakdown.png", "samples_per_s_vs_k.png",
        "staleness.png"]
SERIES = dict(zip(PNGS, [2, 1, 4, 2, 2], strict=True))  # runs, β lines, time parts, β lines, runs: colours C0, C1, ...
TAB10 = [tuple(round(255 * c) for c in rgb) for rgb in plt.get_cmap("tab10").colors]  # the series' colours


@pytest.fixture
def figures() -> Iterator[list[plt.Figure]]:
    """Every figure fdg-report closes during the test, kept open to look at what it drew."""
    kept: list[plt.Figure] = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(plt, "close", kept.append)
        yield kept
    for fig in kept:
        plt.close(fig)


def _assert_png_is(path: Path, fig: plt.Figure, series: int) -> None:
    """The file is this figure drawn, and the colours of its first ``series`` series show in it."""
    png = imread(path)
    again = io.BytesIO()
    fig.savefig(again, dpi=120, format="png")
    again.seek(0)
    drawn = imread(again)
    assert png.shape == drawn.shape and (png == drawn).all(), path.name
    colours = {tuple(c) for c in (255 * png[..., :3]).round().astype(int).reshape(-1, 3).tolist()}
    assert set(TAB10[:series]) <= colours, f"{path.name}: a series' colour is missing"


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
def test_report_table_equals_results_and_plots_show_the_runs(sweep: Path, tmp_path: Path, figures: list[plt.Figure],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    main([str(sweep), "--out", str(out)])
    printed = capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert text in printed
    runs = [load_run(sweep / str(job)) for job in (0, 1)]  # β = 1, 0.5: the order of the legend
    want = {f"fdg β={r.result['beta']:g} K=2": f"{100 * r.result['final_test_error']:.2f} split {r.result['split'][1:-1]}"
            for r in runs}  # the split each run trained beside its error (issue 29)
    assert _table(text) == want and len(want) == 2

    epochs, betas, times, rates, stale = (fig.axes for fig in figures)
    assert [line.get_ydata().tolist() for line in epochs[0].lines] == [
        [100 * e["test_error"] for e in r.epochs] for r in runs]
    medians = betas[0].containers[0].lines[0]  # the errorbar's line: median test error at β = 0.5 and 1
    assert medians.get_ydata().tolist() == [100 * r.result["final_test_error"] for r in runs[::-1]]
    for ax, r in zip(times, runs, strict=True):  # stacked bars: compute, waits, other of modules 0 and 1
        heights = [[bar.get_height() for bar in bars] for bars in ax.containers]
        assert heights == [[t[key] for t in r.timing] for key, _ in report.TIME_PARTS]
    assert [line.get_ydata().tolist() for line in rates[0].lines] == [[r.samples_per_s] for r in runs[::-1]]
    for ax, tag in zip(stale, ("local_cosine", "weight_distance"), strict=True):  # per module, one line a run
        means = [report_staleness.module_means(r.path) for r in runs]
        assert [line.get_ydata().tolist() for line in ax.lines] == [[m[k][tag] for k in (0, 1)] for m in means]

    for name, fig in zip(PNGS, figures, strict=True):  # the files are these figures, drawn
        _assert_png_is(out / name, fig, SERIES[name])


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
              cosines: dict[int, float] | None = None, options: list[str] | None = None,
              split: list[int] | None = None) -> None:
    """A finished run's files as fdg-train writes them; ``cosines`` adds staleness tags for those modules."""
    from torch.utils.tensorboard import SummaryWriter

    run = root / name
    run.mkdir(parents=True)
    result = {"final_test_error": error, "best_test_error": error, "k": k, "beta": beta, "method": "fdg",
              "corrector": corrector, "model": "resnet20", "data": "imagefolder", "seed": seed,
              **({"options": options} if options is not None else {}), **({"split": split} if split else {})}
    (run / "result.json").write_text(json.dumps(result))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "test_error": error, "samples_per_s": 10.0}) + "\n")
    for module, cosine in (cosines or {}).items():
        with SummaryWriter(str(run / "tb" / f"module{module}")) as w:
            for step, c in ((1, 1.0), (11, 2 * cosine - 1.0)):  # mean = cosine
                for tag, value in (("delay_steps", 2 - module), ("weight_distance", 0.01 * (2 - module)),
                                   ("local_cosine", c), ("local_norm_ratio", 1.0)):
                    w.add_scalar(f"staleness/{tag}", value, step)


def test_by_k_table_and_staleness_per_module(tmp_path: Path, figures: list[plt.Figure]) -> None:
    sweep = tmp_path / "sweep"
    _fake_run(sweep, "bp0", k=1, beta=1.0, corrector="none", seed=0, error=0.30, split=[0, 9])
    _fake_run(sweep, "bp1", k=1, beta=1.0, corrector="none", seed=1, error=0.32)
    _fake_run(sweep, "fdg0", k=2, beta=1.0, corrector="none", seed=0, error=0.34, cosines={0: 0.9, 1: 1.0},
              split=[0, 4, 9])
    _fake_run(sweep, "fdg1", k=2, beta=1.0, corrector="none", seed=1, error=0.36, cosines={0: 0.8, 1: 1.0},
              split=[0, 3, 9])  # two splits in one cell: both shown, the comparison is not clean
    _fake_run(sweep, "pred0", k=2, beta=1.0, corrector="predict", seed=0, error=0.31, cosines={0: 0.99, 1: 1.0})
    _fake_run(sweep, "lbd0", k=2, beta=1.0, corrector="lr_by_delay", seed=0, error=0.33, options=["anneal=0.25", "spike"])
    _fake_run(sweep, "warm0", k=2, beta=1.0, corrector="none", seed=0, error=0.32, options=["warmup=16"])
    out = tmp_path / "report"
    main([str(sweep), "--out", str(out)])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")[1:]]
            for line in (out / "by_k.md").read_text().splitlines() if line.startswith("| ") and "setting" not in line}
    assert rows["BP (K=1)"] == ["31.00 [30.00, 32.00]", "–"]
    assert rows["fdg β=1"] == ["–", "35.00 [34.00, 36.00] (+4.00) split [3] or [4]"]
    assert rows["fdg β=1 +predict"] == ["–", "31.00 [31.00] (+0.00)"]
    assert rows["fdg β=1 +lr_by_delay +anneal=0.25 +spike"] == ["–", "33.00 [33.00] (+2.00)"]
    assert rows["fdg β=1 +warmup=16"] == ["–", "32.00 [32.00] (+1.00)"]
    stale = (out / "staleness.md").read_text()
    assert "| fdg β=1 K=2 | 0.850 / 0.0200 / 2.0 | 1.000 / 0.0100 / 1.0 |" in stale  # median of the two seeds
    assert "| fdg β=1 K=2 +predict | 0.990 / 0.0200 / 2.0 |" in stale
    cosine, distance = figures[-1].axes  # per module, one line per setting: the medians of the table
    plotted = [[line.get_ydata().tolist() for line in ax.lines] for ax in (cosine, distance)]
    assert len(plotted[0]) == len(plotted[1]) == 2  # TensorBoard stores float32: approximately
    assert plotted == [[pytest.approx([0.85, 1.0]), pytest.approx([0.99, 1.0])], [pytest.approx([0.02, 0.01])] * 2]
    _assert_png_is(out / "staleness.png", figures[-1], 2)


@pytest.mark.parametrize("name,text,where", [
    ("metrics.jsonl", '{"epoch": 0, "test_error": 0.5, "samples_per_s": 10.0}\n{"epoch": 1, "test_e', "metrics.jsonl: line 2"),
    ("result.json", '{"final_test_error": 0.5, "k"', "result.json"),
])
def test_a_damaged_record_is_one_line_naming_the_file(tmp_path: Path, name: str, text: str, where: str) -> None:
    """Issue 27: a metrics.jsonl cut short ended fdg-report with json's traceback."""
    _fake_run(tmp_path, "run", k=2, beta=1.0, corrector="none", seed=0, error=0.5)
    (tmp_path / "run" / name).write_text(text)
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path), "--out", str(tmp_path / "out")])
    message = str(stop.value)
    assert message.startswith(f"fdg-report: {tmp_path / 'run' / where} is damaged (JSONDecodeError: "), message
    assert message.endswith("repair or remove it, or leave that run out of the report") and "\n" not in message
