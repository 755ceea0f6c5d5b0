"""The FDG authors' published results, one entry per ``conf/experiment`` preset: the single source of each
preset's β (and of the numbers its comment quotes), checked by tests/test_config_compose.py.

Source: the tables of the README of github.com/ZHUANGHP/FDG (commit c3ed646, "Update README.md"), which
supersede the arXiv:1906.09108 v1 numbers; test errors are medians of 3 runs, 300 epochs.  ``table`` names
the README table, ``row`` its row; ``beta`` is the shrinking factor of the bold (best) FDG result.

Must not import any other part of fdg_dist: it is data that the presets' tests read.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperRow:
    table: str
    row: str
    fdg_beta1: float  # FDG test error (%) at β = 1
    fdg_best: float  # FDG test error (%) at the best β
    beta: float


README = "github.com/ZHUANGHP/FDG README (commit c3ed646)"
PAPER_ROWS: dict[str, PaperRow] = {
    "cifar10_resnet20_k2": PaperRow("K=2, CIFAR-10", "ResNet-20", 7.92, 7.23, 0.2),
    "cifar10_resnet56_k2": PaperRow("K=2, CIFAR-10", "ResNet-56", 6.20, 5.90, 0.5),
    "cifar10_resnet110_k2": PaperRow("K=2, CIFAR-10", "ResNet-110", 5.79, 5.73, 0.5),
    "cifar10_resnet18_k2": PaperRow("K=2, CIFAR-10", "ResNet-18", 4.82, 4.79, 0.8),
    "cifar10_wrn28_10_k2": PaperRow("K=2, CIFAR-10", "WRN-28-10 (36.5M)", 4.13, 3.85, 0.7),
    "cifar10_wrn28_10_k4": PaperRow("K=2, CIFAR-10", "WRN-28-10 (36.5M); the K=4 timing row reuses its β",
                                    4.13, 3.85, 0.7),
    "cifar10_resnet56_k3": PaperRow("For multiple GPUs (CIFAR-10 with ResNet-56)", "K=3", 6.20, 6.08, 0.5),
    "cifar10_resnet56_k4": PaperRow("For multiple GPUs (CIFAR-10 with ResNet-56)", "K=4", 6.83, 6.14, 0.5),
    "cifar100_resnet56_k2": PaperRow("K=2, CIFAR-100", "ResNet-56", 27.87, 27.49, 0.4),
    "cifar100_resnet110_k2": PaperRow("K=2, CIFAR-100", "ResNet-110", 25.73, 25.43, 0.5),
    "cifar100_resnet18_k2": PaperRow("K=2, CIFAR-100", "ResNet-18", 22.78, 22.18, 0.5),
    "cifar100_wrn28_10_k2": PaperRow("K=2, CIFAR-100", "WRN-28-10", 20.28, 19.08, 0.6),
}
