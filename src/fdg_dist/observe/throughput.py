"""How fast a language model trains: tokens per second and an estimated model FLOPs utilisation (MFU).

MFU as nanoGPT (and PaLM, appendix B) estimates it: a training token costs 6N FLOPs for the N weights a
token passes through (forward 2N, backward 4N; the position embedding is a lookup, left out) plus
12·layers·width·context for attention's scores and weighted sums; MFU is that work per second over the
peak of the hardware the run uses, ``logging.peak_tflops`` per process (summed over the run's processes),
or for a known GPU its dense peak at the run's precision.  Must not time anything itself: the epoch
records bring the seconds.
"""

from __future__ import annotations

import torch

from fdg_dist import models
from fdg_dist.config import Config

# dense peak TFLOPS per GPU (NVIDIA's data sheets, without sparsity): fp32 runs use TF32 tensor cores' rate
# only when allowed, so fp32 is the plain FP32 rate
PEAK_TFLOPS = {"H200": {"bf16": 989.0, "fp32": 67.0}, "H100": {"bf16": 989.0, "fp32": 67.0},
               "A100": {"bf16": 312.0, "fp32": 19.5}}


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token: 6 × weights (the position embedding left out) + attention's 12·L·width·T."""
    model = models.build(cfg.model, cfg.data.num_classes, device="meta")
    weights = sum(p.numel() for name, p in model.named_parameters() if not name.endswith("positions.weight"))
    attention = 0
    if cfg.model.name == "gpt":
        a = cfg.model.args
        attention = 12 * a.get("layers", 4) * a.get("width", 128) * cfg.data.context
    return float(6 * weights + attention)


def peak_flops(cfg: Config, device: torch.device) -> float | None:
    """The run's peak FLOP/s: ``logging.peak_tflops`` per process, else a known GPU's, × the run's processes;
    None where neither is known (a CPU without ``logging.peak_tflops``)."""
    per_process = cfg.logging.peak_tflops
    if per_process is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        per_process = next((p[cfg.trainer.precision] for gpu, p in PEAK_TFLOPS.items() if gpu in name), None)
    return None if per_process is None else per_process * 1e12 * cfg.world_size


def rates(tokens: int, seconds: float, flops_token: float, peak: float | None) -> dict[str, float]:
    """``tokens_per_s`` and, where the peak is known, ``mfu`` (a fraction) of an epoch's training pass."""
    per_s = tokens / seconds if seconds > 0 else 0.0
    out = {"tokens_per_s": per_s}
    if peak is not None:
        out["mfu"] = per_s * flops_token / peak
    return out
