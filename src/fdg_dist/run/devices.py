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

Must not create a process group: validation imports it before any exists.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def gpus_in_use(local_world: int, count: int, ranks_per_gpu: int | None) -> int:
    """How many of the ``count`` visible GPUs ``local_world`` local ranks spread over: one rank per GPU while
    there are enough, else as few ranks per GPU as fit (``ranks_per_gpu`` null); ``ranks_per_gpu`` m packs m
    ranks on each GPU (the last may hold fewer)."""
    if ranks_per_gpu is None:
        return min(count, local_world)
    return -(-local_world // ranks_per_gpu)


def gpu_of(local_rank: int, gpus: int) -> int:
    """The GPU local rank ``local_rank`` computes on: round robin, so ranks that share a GPU are as few as can be
    and neighbouring modules sit on different GPUs whenever there are two."""
    return local_rank % gpus


MULTI_RANK_NCCL = (2, 30)  # the first NCCL that runs several ranks of one communicator on one GPU


def check_device(backend: str, local_rank: int, precision: str, *, local_world: int | None = None,
                 ranks_per_gpu: int | None = None) -> torch.device:
    """The device local rank ``local_rank`` (of ``local_world`` on this machine) computes on, or one line saying
    why this machine cannot run it.

    Caught at start (by the CLI for all its local ranks, by every worker for itself) instead of as a CUDA
    error deep in the first NCCL call or the first bf16 message.  More ranks than GPUs share them
    (``dist.ranks_per_gpu``), which NCCL allows from 2.30 on.
    """
    if backend != "nccl":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError("dist.backend", "nccl needs CUDA GPUs and torch sees none here; use dist.backend=gloo "
                          "(or auto) to train on the CPU")
    local_world = local_rank + 1 if local_world is None else local_world
    count = torch.cuda.device_count()
    gpus = gpus_in_use(local_world, count, ranks_per_gpu)
    if gpus > count:
        raise DeviceError("dist.ranks_per_gpu", f"{local_world} processes on this machine at dist.ranks_per_gpu="
                          f"{ranks_per_gpu} need {gpus} GPUs but {count} are visible (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); raise dist.ranks_per_gpu to at least "
                          f"{-(-local_world // count)} or set it to null")
    if gpus < local_world and nccl_version() < MULTI_RANK_NCCL:
        raise DeviceError("dist.ranks_per_gpu", f"{local_world} processes share {gpus} GPU(s) but torch's NCCL "
                          f"{'.'.join(map(str, nccl_version()))} runs one rank per GPU (several need NCCL ≥ 2.30: "
                          "torch ≥ 2.14); upgrade torch, lower pipeline.k × pipeline.replicas, or use dist.backend=gloo")
    device = torch.device("cuda", gpu_of(local_rank, gpus))
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise DeviceError("trainer.precision", f"bf16 but {torch.cuda.get_device_name(device)} has no bfloat16 "
                          "support; use trainer.precision=fp32")
    return device


def nccl_version() -> tuple[int, ...]:
    """The NCCL torch was built with, as (major, minor, patch)."""
    return tuple(v for v in torch.cuda.nccl.version() if isinstance(v, int))  # a suffix ("a0") left out


MPS_PIPE = "/tmp/nvidia-mps"  # nvidia-cuda-mps-control's default pipe directory


def sharing_environment(ranks_on_gpu: int) -> dict[str, str]:
    """NCCL's settings for ``ranks_on_gpu`` ranks on one GPU (NCCL 2.30's multi-rank mode), applied to every
    worker before its first NCCL call unless the user set them: the mode itself, NVLink SHARP off (it binds
    one rank per GPU), and each rank's NCCL kernels capped in CTAs so that the ranks' communication kernels
    fit on the GPU's SMs beside each other's compute (a cap chosen, not measured)."""
    if ranks_on_gpu <= 1:
        return {}
    return {"NCCL_MULTI_RANK_GPU_ENABLE": "1", "NCCL_NVLS_ENABLE": "0",
            "NCCL_MAX_CTAS": str(max(2, 16 // ranks_on_gpu))}


def mps_running() -> bool:
    """Whether an MPS control daemon serves this machine: CUDA then runs every rank's kernels in one context
    (true concurrency between the ranks that share a GPU, no time slicing); nothing to do but start it."""
    pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", MPS_PIPE))
    return (pipe / "control").exists()


def share_gpus(local_world: int, ranks_per_gpu: int | None) -> list[str]:
    """Before NCCL starts in this worker: set the environment ranks sharing a GPU need (keeping what the user
    set); returns the lines for the run log (none when every rank has a GPU of its own)."""
    gpus = gpus_in_use(local_world, torch.cuda.device_count(), ranks_per_gpu)
    if gpus == 0:
        return []  # no GPU: check_device says so in its own line
    most = -(-local_world // gpus)
    settings = sharing_environment(most)
    if not settings:
        return []
    for name, value in settings.items():
        os.environ.setdefault(name, value)
    applied = " ".join(f"{n}={os.environ[n]}" for n in settings)
    mps = ("MPS daemon running: the ranks' kernels run concurrently" if mps_running() else
           "no MPS daemon (nvidia-cuda-mps-control -d starts one): the ranks time-slice each GPU")
    return [f"{local_world} ranks on {gpus} GPU(s), up to {most} per GPU (NCCL "
            f"{'.'.join(map(str, nccl_version()))}): {applied}; {mps}"]
