"""``fdg-report``'s staleness part: the ``staleness/`` TensorBoard tags of each run, per module, as a table and a plot.

Each run's ``tb/module<k>`` is read back with TensorBoard's ``EventAccumulator``; a module's value is the mean
of its probes over the run, and a setting's (method, β, K, corrector) the median over its seeds.

Must not write into a run directory: it only reads its TensorBoard files.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fdg_dist.engine.staleness import TAGS

Label = Callable[[Any], str]


def module_means(run_dir: Path) -> dict[int, dict[str, float]]:
    """{module: {tag: mean over the run's probes}} for every module that logged ``staleness/`` tags."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, dict[str, float]] = {}
    for tb in sorted((run_dir / "tb").glob("module*")):
        if "-replica" in tb.name:
            continue
        acc = EventAccumulator(str(tb), size_guidance={"scalars": 0}).Reload()
        scalars = set(acc.Tags()["scalars"])
        if f"staleness/{TAGS[0]}" not in scalars:
            continue
        out[int(tb.name.removeprefix("module"))] = {
            tag: statistics.fmean(e.value for e in acc.Scalars(f"staleness/{tag}")) for tag in TAGS}
    return out


def by_setting(runs: list, label: Label) -> dict[str, dict[int, dict[str, float]]]:
    """{setting label: {module: {tag: median over the setting's runs}}}, settings with staleness tags only."""
    groups: dict[str, list[dict[int, dict[str, float]]]] = defaultdict(list)
    for run in runs:
        means = module_means(run.path)
        if means:
            groups[label(run)].append(means)
    return {name: {k: {tag: statistics.median(m[k][tag] for m in group if k in m) for tag in TAGS}
                   for k in sorted({k for m in group for k in m})}
            for name, group in sorted(groups.items())}


def table(settings: dict[str, dict[int, dict[str, float]]]) -> str:
    """Markdown: per setting, per module: local cosine / weight distance / delay (steps)."""
    if not settings:
        return ""
    K = max(len(modules) for modules in settings.values())
    lines = ["### staleness per module: local cosine / relative weight distance / delay (steps); "
             "mean over probes, median over seeds", "",
             "| setting | " + " | ".join(f"module {k}" for k in range(K)) + " |", "|---|" + "---:|" * K]
    for name, modules in settings.items():
        cells = [f"{m['local_cosine']:.3f} / {m['weight_distance']:.4f} / {m['delay_steps']:.1f}"
                 if (m := modules.get(k)) else "–" for k in range(K)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def plot(settings: dict[str, dict[int, dict[str, float]]], path: Path) -> Path:
    """Local cosine and relative weight distance against the module index, one line per setting."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = plt.get_cmap("tab10").colors
    for ax in axes:
        ax.set_prop_cycle(color=[colors[i % 10] for i in range(40)], linestyle=["-", "--", ":", "-."] * 10)
        ax.grid(alpha=0.3)
    for name, modules in settings.items():
        ks = sorted(modules)
        axes[0].plot(ks, [modules[k]["local_cosine"] for k in ks], marker="o", label=name)
        axes[1].plot(ks, [modules[k]["weight_distance"] for k in ks], marker="o", label=name)
    axes[0].set(xlabel="module k (input → output)", ylabel="cosine(applied, local fresh gradient)",
                title="How far the applied gradient is from a fresh one")
    axes[1].set(xlabel="module k (input → output)", ylabel="‖w_stashed − w_live‖ / ‖w_live‖",
                title="How far the weights moved since the forward")
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[1].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
