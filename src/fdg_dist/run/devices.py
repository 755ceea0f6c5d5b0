"""The device a rank computes on: whether this machine can run the configuration there, and what runs fastest.

``check_device`` says in one line why a machine cannot run a configuration (no GPU for NCCL, a rank without
a GPU, no bf16); the CLI applies it for all its local ranks before any worker starts, and every worker to
itself.  It needs no process group, so validation can ask it.

``resolve`` turns the settings whose default is ``auto`` into what runs fastest on the device.  Users run the
defaults, so the defaults are the fastest settings we measured: on the CPU (gloo, one
thread per rank, see README "Performance") NHWC convolutions. On CUDA nothing has been measured yet, so the
choice follows torch's guidance: NHWC is the native layout of cuDNN's tensor-core convolutions (torch's
channels-last tutorial).  The split is the exception to "fastest": a split changes FDG's arithmetic, so
``auto`` is the counted cost (``split.counted``: FLOPs and bytes moved, the same split in every run, ranked
within a few % of the measured favourite), and a measured split (``pipeline.cost=time``) is an explicit opt-in.  An
explicit ``trainer.channels_last`` or ``pipeline.cost`` always wins; the run log says what ``auto`` became.
"""

from __future__ import annotations

import os

import torch

from fdg_dist.config import Config

# device type -> setting -> (value, why); settings read as "section.key" of the config
FASTEST: dict[str, dict[str, tuple[object, str]]] = {
    "cpu": {
        "trainer.channels_last": (True, "NHWC measured faster on the CPU: +24 % BP, +26 % FDG on ResNet-56"),
        "pipeline.cost": ("counted", "counted FLOPs and bytes: the same split in every run; time is the opt-in"),
    },
    "cuda": {
        "trainer.channels_last": (True, "torch's guidance for cuDNN convolutions; not yet measured here"),
        "pipeline.cost": ("counted", "counted FLOPs and bytes: the same split in every run; time is the opt-in"),
    },
}


def resolve(cfg: Config, device: torch.device, *, convolutions: bool = True) -> list[str]:
    """Replace every ``auto`` of the settings above in ``cfg`` (in place) by the fastest for ``device``.

    Returns one line per replaced setting, for the run log, except the memory format of a model without
    ``convolutions`` (an MLP, GPT: NHWC changes nothing there).  A device type we have no figures for takes
    the CPU's choices.
    """
    table = FASTEST.get(device.type, FASTEST["cpu"])
    lines = []
    for key, (value, why) in table.items():
        section, name = key.split(".")
        owner = getattr(cfg, section)
        if getattr(owner, name) == "auto":
            setattr(owner, name, value)
            if convolutions or key != "trainer.channels_last":
                lines.append(f"{key}=auto -> {str(value).lower()} on {device.type} ({why})")
    return lines


def fastest(key: str, device_type: str) -> object:
    """What ``auto`` becomes for ``key`` ("section.key") on a device of ``device_type`` ("cpu", "cuda")."""
    return FASTEST.get(device_type, FASTEST["cpu"])[key][0]


def choose_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


class DeviceError(RuntimeError):
    """This machine cannot run the configuration (no GPU for NCCL, a rank without a GPU, no bf16); ``key`` is
    the setting to change."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def check_device(backend: str, local_rank: int, precision: str) -> torch.device:
    """The device local rank ``local_rank`` computes on, or one line saying why this machine cannot run it.

    Caught at start (by the CLI for all its local ranks, by every worker for itself) instead of as a CUDA
    error deep in the first NCCL call or the first bf16 message.
    """
    if backend != "nccl":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError("dist.backend", "nccl needs CUDA GPUs and torch sees none here; use dist.backend=gloo "
                          "(or auto) to train on the CPU")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeviceError("dist.backend", f"NCCL runs one process per GPU (it refuses two ranks on one GPU): "
                          f"{local_rank + 1} processes on this machine but {count} GPU(s) visible "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); lower "
                          "pipeline.k × pipeline.replicas (or --nproc_per_node) or use dist.backend=gloo")
    device = torch.device("cuda", local_rank)
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise DeviceError("trainer.precision", f"bf16 but {torch.cuda.get_device_name(device)} has no bfloat16 "
                          "support; use trainer.precision=fp32")
    return device
