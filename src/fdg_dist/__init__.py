"""fdg_dist: FDG training, one process per pipeline module.

``fdg_dist.load_model(run_dir)`` returns a finished run's model and its input transform (see
``fdg_dist.inference``); ``fdg_dist.sample(run_dir, prompt)`` draws text from a language-model run
(``fdg_dist.sampling``).  Both are imported on first use, so ``import fdg_dist.config`` (the CLI, the
Hydra callbacks, ``fdg-report``) stays free of torch.

Must not import torch or any layer when it is imported: ``load_model`` is the one lazy import the layer rules
allow (tests/test_layers.py).
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_model", "sample"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from fdg_dist.inference import load_model

        return load_model
    if name == "sample":
        from fdg_dist.sampling import sample

        return sample
    raise AttributeError(f"module 'fdg_dist' has no attribute {name!r}")
