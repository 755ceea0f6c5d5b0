"""Settings whose default (``auto``) is what runs fastest on the device the run is on.

Users run the defaults, so the defaults are the fastest settings we measured: on the CPU (gloo, one
thread per rank, see README "Performance") NHWC convolutions and a split chosen by measured time. On
CUDA nothing has been measured yet, so the choice follows torch's guidance: NHWC is the native layout
of cuDNN's tensor-core convolutions (torch's channels-last tutorial), and a measured split sees what
counted FLOPs miss on every device (memory-bound BatchNorm and ReLU on large activations).  An
explicit ``trainer.channels_last`` or ``pipeline.cost`` always wins; the run log says what ``auto`` became.
"""

from __future__ import annotations

import torch

from fdg_dist.config import Config

# device type -> setting -> (value, why); settings read as "section.key" of the config
FASTEST: dict[str, dict[str, tuple[object, str]]] = {
    "cpu": {
        "trainer.channels_last": (True, "NHWC measured faster on the CPU: +24 % BP, +26 % FDG on ResNet-56"),
        "pipeline.cost": ("time", "a measured split measured faster on the CPU: 1.72x instead of 1.58x for FDG"),
    },
    "cuda": {
        "trainer.channels_last": (True, "torch's guidance for cuDNN convolutions; not yet measured here"),
        "pipeline.cost": ("time", "measured per-block time on the GPU; not yet compared with FLOPs here"),
    },
}


def resolve(cfg: Config, device: torch.device) -> list[str]:
    """Replace every ``auto`` of the settings above in ``cfg`` (in place) by the fastest for ``device``.

    Returns one line per replaced setting, for the run log.  A device type we have no figures for takes
    the CPU's choices.
    """
    table = FASTEST.get(device.type, FASTEST["cpu"])
    lines = []
    for key, (value, why) in table.items():
        section, name = key.split(".")
        owner = getattr(cfg, section)
        if getattr(owner, name) == "auto":
            setattr(owner, name, value)
            lines.append(f"{key}=auto -> {str(value).lower()} on {device.type} ({why})")
    return lines


def fastest(key: str, device_type: str) -> object:
    """What ``auto`` becomes for ``key`` ("section.key") on a device of ``device_type`` ("cpu", "cuda")."""
    return FASTEST.get(device_type, FASTEST["cpu"])[key][0]
