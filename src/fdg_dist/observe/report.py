"""``fdg-report RUNS_DIR… [--out DIR]``: compare finished runs like the paper's tables, plus plots.

Any directory under the arguments that holds a ``result.json`` is a run (a single run dir, a Hydra
multirun sweep dir, or a tree of them).  Prints a markdown table per dataset (rows: model; columns:
method/β/K; cells: test error in %, median over seeds, and the split the runs trained) and writes it to ``<out>/report.md`` (default:
``report/`` inside RUNS_DIR) with four PNGs: test error per epoch per run, test error against β per K
with the seed spread, the per-module time breakdown (where the pipeline waits: its bubbles) and
samples/s against K.  ``by_k.md`` has one row per method/β/corrector (with the other delay treatments a
run used, ``+spike``, ``+warmup=16``, …) and one column per K (mean over seeds, each seed's value, the gap to
BP); where runs logged ``staleness/`` tags, ``staleness.md`` and ``staleness.png`` show them per module
(``report_staleness``).

Must not import anything of a run in progress (engine, run): it reads finished runs' files, and writes only
under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed (CI, clusters)
import matplotlib.pyplot as plt  # noqa: E402

from fdg_dist.observe import report_staleness  # noqa: E402
from fdg_dist.util.files import parse_json  # noqa: E402

BETA_METHODS = ("fdg", "adl")  # methods where β means something; for the others it is left out
UNITS = {"final_test_error": ("%", 100.0), "best_test_error": ("%", 100.0), "final_test_bpc": ("bits/token", 1.0)}
TIME_PARTS = (("compute_s", "compute"), ("wait_input_s", "waiting for input"),
              ("wait_grad_s", "waiting for gradient"), ("other_s", "communication / other"))


@dataclass
class Run:
    path: Path
    result: dict
    epochs: list[dict]  # metrics.jsonl rows
    timing: list[dict]  # timing/*.json, one per rank, in (replica, module) order

    @property
    def beta(self) -> float | None:
        return self.result["beta"] if self.result["method"] in BETA_METHODS else None

    @property
    def corrector(self) -> str:
        """The corrector and the other delay treatments (``config.staleness_options``): ``lr_by_delay +spike``;
        ``none`` for the paper's algorithm."""
        parts = [self.result.get("corrector", "none"), *self.result.get("options", [])]
        return " +".join(parts[1:] if parts[0] == "none" and len(parts) > 1 else parts)

    @property
    def setting(self) -> tuple:
        """What a table column is: the method, its β where it has one, K, and the staleness corrector."""
        return self.result["method"], self.beta, self.result["k"], self.corrector

    @property
    def samples_per_s(self) -> float | None:
        """Median over epochs: robust to the slow first epoch."""
        rates = [e["samples_per_s"] for e in self.epochs]
        return statistics.median(rates) if rates else None


def find_runs(paths: Iterable[Path]) -> list[Run]:
    dirs = sorted({p.parent.resolve() for root in paths for p in Path(root).rglob("result.json")})
    return [load_run(d) for d in dirs]


def load_run(path: Path) -> Run:
    """A run's records; a damaged one is a ValueError naming the file (and the line of ``metrics.jsonl``)."""
    metrics = path / "metrics.jsonl"
    epochs = [_parse(line, f"{metrics}: line {n}") for n, line in enumerate(metrics.read_text().splitlines(), 1)
              if line.strip()] if metrics.exists() else []
    timing = [_parse(p.read_text(), str(p)) for p in (path / "timing").glob("*.json")]
    timing.sort(key=lambda t: (t["replica"], t["module"]))
    return Run(path, _parse((path / "result.json").read_text(), str(path / "result.json")), epochs, timing)


def _parse(text: str, where: str) -> dict:
    return parse_json(text, where, "repair or remove it, or leave that run out of the report")


def scaled(result: dict, metric: str) -> float | None:
    """``metric`` of a run as the tables show it (errors in %, bits per character as they are); None if absent."""
    value = result.get(metric)
    return None if value is None else UNITS[metric][1] * value


def unit(metric: str) -> str:
    return UNITS[metric][0]


def default_metric(runs: list[Run]) -> str:
    """Language models are compared by validation bits per character, everything else by test error."""
    return "final_test_bpc" if runs and all(r.result.get("final_test_bpc") is not None for r in runs) \
        else "final_test_error"


def setting_label(method: str, beta: float | None, k: int, corrector: str = "none") -> str:
    label = f"{method} β={beta:g} K={k}" if beta is not None else f"{method} K={k}"
    return label + (f" +{corrector}" if corrector != "none" else "")


def _row_label(run: Run) -> str:
    """A setting without its K: BP (any method at K = 1 is back-propagation), or method, β and corrector."""
    if run.result["k"] == 1:
        return "BP (K=1)"
    method, beta, _, corrector = run.setting
    return setting_label(method, beta, 0, corrector).replace(" K=0", "")


def table_by_k(runs: list[Run], metric: str = "final_test_error") -> str:
    """Markdown per dataset and model: rows method/β/corrector, columns K; cells the mean over seeds, each
    seed's value and the gap to BP's mean (K = 1 runs), in points."""
    out = []
    for (data, model), group in _groups(runs, lambda r: (r.result["data"], r.result["model"])).items():
        ks = sorted({r.result["k"] for r in group})
        cells = _groups(group, lambda r: (_row_label(r), r.result["k"]))
        rows = sorted({label for label, _ in cells}, key=lambda x: (x != "BP (K=1)", x))
        bp = [scaled(r.result, metric) for r in cells.get(("BP (K=1)", 1), []) if r.result.get(metric) is not None]
        base = statistics.fmean(bp) if bp else None
        out += [f"### {data}, {model}: {metric.replace('_', ' ')} ({unit(metric)}): mean over seeds [seeds] (gap to BP)", "",
                "| setting | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
        for label in rows:
            row = []
            for k in ks:
                values = [scaled(r.result, metric) for r in sorted(cells.get((label, k), []), key=lambda r: r.result["seed"])
                          if r.result.get(metric) is not None]
                if not values:
                    row.append("–")
                    continue
                mean = statistics.fmean(values)
                gap = f" ({mean - base:+.2f})" if base is not None and label != "BP (K=1)" else ""
                row.append(f"{mean:.2f} [{', '.join(f'{v:.2f}' for v in values)}]{gap}{splits(cells[(label, k)])}")
            out.append(f"| {label} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def _groups(runs: Iterable[Run], key: Callable[[Run], tuple]) -> dict[tuple, list[Run]]:
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        groups[key(run)].append(run)
    return dict(sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])))


def splits(runs: list[Run]) -> str:
    """`` split [3]``: where the cell's runs start modules 1..K-1 (a split changes FDG's arithmetic, so runs compared
    should share it); several, joined by ``or``, when they differ; nothing for runs that did not record it."""
    found = sorted({tuple(r.result["split"][1:-1]) for r in runs if r.result.get("split") and len(r.result["split"]) > 2})
    return f" split {' or '.join(str(list(b)) for b in found)}" if found else ""


def _median_error(runs: list[Run], metric: str) -> float | None:
    values = [scaled(r.result, metric) for r in runs if r.result.get(metric) is not None]
    return statistics.median(values) if values else None


def table(runs: list[Run], metric: str = "final_test_error") -> str:
    """Markdown, one table per dataset: test error in %, median over the runs (seeds) of a cell."""
    out = []
    for (data,), of_data in _groups(runs, lambda r: (r.result["data"],)).items():
        columns = sorted({r.setting for r in of_data}, key=lambda s: (s[0], s[2], s[1] or 0, s[3]))
        cells = _groups(of_data, lambda r: (r.result["model"], r.setting))
        models = sorted({r.result["model"] for r in of_data})
        out += [f"### {data}: {metric.replace('_', ' ')} ({unit(metric)}), median over seeds", "",
                "| model | " + " | ".join(setting_label(*c) for c in columns) + " |",
                "|---|" + "---:|" * len(columns)]
        for model in models:
            row = []
            for column in columns:
                group = cells.get((model, column), [])
                value = _median_error(group, metric)
                text = "–" if value is None else f"{value:.2f}"
                row.append(text + (f" (n={len(group)})" if len(group) > 1 else "") + splits(group))
            out.append(f"| {model} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def _run_labels(runs: list[Run]) -> list[str]:
    """Legend text naming only what differs between the runs (model, data, method/β/K, seed)."""
    parts = [(lambda r: r.result["model"]), (lambda r: r.result["data"]), (lambda r: setting_label(*r.setting)),
             (lambda r: f"seed {r.result['seed']}")]
    varying = [p for p in parts if len({p(r) for r in runs}) > 1] or parts[2:3]
    return [" ".join(p(r) for p in varying) for r in runs]


def _line_axes() -> tuple[plt.Figure, plt.Axes]:
    """A line plot whose lines differ in colour and dash, so lines lying on each other stay visible."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab10").colors
    ax.set_prop_cycle(color=[colors[i % 10] for i in range(40)], linestyle=["-", "--", ":", "-."] * 10)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_error_vs_epoch(runs: list[Run], path: Path) -> Path:
    fig, ax = _line_axes()
    for run, label in zip(runs, _run_labels(runs)):
        ax.plot([e["epoch"] + 1 for e in run.epochs], [100 * e["test_error"] for e in run.epochs],
                marker="o" if len(run.epochs) < 20 else None, label=label)
    ax.set(xlabel="epoch", ylabel="test error (%)", title="Test error during training, one line per run")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize="small")
    return _save(fig, path)


MIN_ERROR_SPAN = 2.0  # percentage points: a y-axis at least this tall, so run-to-run noise does not look like a trend


def plot_error_vs_beta(runs: list[Run], path: Path, metric: str = "final_test_error") -> Path:
    """Median over seeds per β, one line per K; every seed as a dot and its min–max as a bar, so a trend
    can be told from seed noise."""
    fig, ax = _line_axes()
    with_beta = [r for r in runs if r.beta is not None and r.result.get(metric) is not None]
    lines = _groups(with_beta, lambda r: (r.result["data"], r.result["model"], r.result["method"], r.result["k"],
                                          r.corrector))
    values: list[float] = []
    for (data, model, method, k, corrector), group in lines.items():
        by_beta = _groups(group, lambda r: (r.beta,))
        betas = sorted(b for (b,) in by_beta)
        seeds = [[scaled(r.result, metric) for r in by_beta[(b,)]] for b in betas]
        medians = [statistics.median(s) for s in seeds]
        spread = [[m - min(s) for m, s in zip(medians, seeds)], [max(s) - m for m, s in zip(medians, seeds)]]
        counts = sorted({len(s) for s in seeds})
        n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        line = ax.errorbar(betas, medians, yerr=spread, marker="o", capsize=3,
                           label=f"{model} ({data}) {method} K={k}" + (f" +{corrector}" if corrector != "none" else "")
                           + f", n={n} seed(s)")
        for b, s in zip(betas, seeds):
            ax.plot([b] * len(s), s, linestyle="none", marker=".", alpha=0.5, color=line.lines[0].get_color())
        values += [v for s in seeds for v in s]
    if values:
        low, high = min(values), max(values)
        pad = max(MIN_ERROR_SPAN - (high - low), 0) / 2
        ax.set_ylim(low - pad - 0.1 * MIN_ERROR_SPAN, high + pad + 0.1 * MIN_ERROR_SPAN)
    ax.set(xlabel="β (gradient shrinking per hop)", ylabel=f"{metric.replace('_', ' ')} ({unit(metric)})",
           title="Test error against β, one line per K\n(median over n seeds; dots: each seed; bars: min–max)")
    if lines:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_time_breakdown(runs: list[Run], path: Path) -> Path:
    """Per run, one stacked bar per module: where its training time went."""
    runs = [r for r in runs if r.timing]
    cols = min(max(len(runs), 1), 3)
    rows = max(-(-len(runs) // cols), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, run, label in zip(axes.flat, runs, _run_labels(runs)):
        replicated = any(t["replica"] for t in run.timing)
        names = [f"{t['module']}" + (f" r{t['replica']}" if replicated else "") for t in run.timing]
        bottom = [0.0] * len(names)
        for (key, text), color in zip(TIME_PARTS, colors):
            values = [t[key] for t in run.timing]
            ax.bar(names, values, bottom=bottom, label=text, color=color)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set(title=label, xlabel="module k" + (", replica r" if replicated else "") + " (input → output)",
               ylabel="training time, all epochs (s)")
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(TIME_PARTS), fontsize="small")
    fig.suptitle("Where each module's time goes (waits are the pipeline's bubbles)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_samples_vs_k(runs: list[Run], path: Path) -> Path:
    fig, ax = _line_axes()
    timed = [r for r in runs if r.samples_per_s is not None]
    lines = _groups(timed, lambda r: (r.result["data"], r.result["model"], r.result["method"], r.beta))
    for (data, model, method, beta), group in lines.items():
        by_k = _groups(group, lambda r: (r.result["k"],))
        ks = sorted(k for (k,) in by_k)
        label = f"{model} ({data}) {method}" + (f" β={beta:g}" if beta is not None else "")
        ax.plot(ks, [statistics.median(r.samples_per_s for r in by_k[(k,)]) for k in ks], marker="o", label=label)
    ax.set(xlabel="K (pipeline modules = processes)", ylabel="training throughput (samples/s)",
           title="Throughput against K (median over epochs and seeds)")
    ax.set_xticks(sorted({r.result["k"] for r in timed}))  # K is whole: no 1.75 or 2.25 ticks around one K
    ax.set_ylim(bottom=0)  # throughput from zero: a 2 % difference should look like one
    if lines:
        ax.legend(fontsize="small")
    return _save(fig, path)


def report(paths: Iterable[Path], out: Path, metric: str | None = None) -> str:
    """The tables and plots of the runs under ``paths``; ``metric`` None: ``default_metric``."""
    runs = find_runs(paths)
    if not runs:
        raise SystemExit(f"fdg-report: no run (a directory with result.json) under {' '.join(map(str, paths))}")
    metric = metric or default_metric(runs)
    out.mkdir(parents=True, exist_ok=True)
    text = table(runs, metric)
    (out / "report.md").write_text(text)
    plot_error_vs_epoch(runs, out / "test_error_vs_epoch.png")
    plot_error_vs_beta(runs, out / "test_error_vs_beta.png", metric)
    plot_time_breakdown(runs, out / "time_breakdown.png")
    plot_samples_vs_k(runs, out / "samples_per_s_vs_k.png")
    by_k = table_by_k(runs, metric)
    (out / "by_k.md").write_text(by_k)
    stale = report_staleness.by_setting(runs, lambda r: setting_label(*r.setting))
    if stale:
        (out / "staleness.md").write_text(report_staleness.table(stale))
        report_staleness.plot(stale, out / "staleness.png")
    return text + "\n" + by_k + ("\n" + report_staleness.table(stale) if stale else "")


def default_out(paths: list[Path]) -> Path:
    """``report/`` inside the runs folder reported on (their common folder if several), not in the
    current directory, which inside a clone would be an untracked folder."""
    return Path(os.path.commonpath([p.resolve() for p in paths])) / "report"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fdg-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run or sweep directories (searched recursively)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where report.md and the PNGs go (default: report/ inside the runs folder)")
    parser.add_argument("--metric", choices=tuple(UNITS), default=None,
                        help="what the tables compare (default: final_test_bpc if every run is a language model, "
                             "else final_test_error)")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else default_out(args.runs)
    try:
        print(report(args.runs, out, args.metric))
    except ValueError as e:
        raise SystemExit(f"fdg-report: {e}") from None
    print(f"wrote {(out / 'report.md').resolve()}, {(out / 'by_k.md').resolve()} and the plots beside them", flush=True)


if __name__ == "__main__":
    main()
