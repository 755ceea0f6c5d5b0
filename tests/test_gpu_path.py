"""What the GPU path needs beyond NCCL's matching rules, shown on the CPU.

- No host synchronisation in the steady state: the real stages and executor run on the ``meta`` device,
  where reading any value (``.item()``, ``bool()``, ``float()``, ``.cpu()``) raises, for every method.
- Device hygiene: every tensor the stage and executor make lives on the stage's device (headers, on
  the host by design, aside).
- Device time: with a GPU the time split comes from CUDA events (a fake event clock here).
- Failure: after an error the process groups are aborted, never destroyed (torch calls faked).
- Clear errors at start for what the machine cannot do.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import small_config
from emulated import fake_timeline, run_emulated
from torch.utils._python_dispatch import TorchDispatchMode

from fdg_dist.engine.executor import DeviceClock
from fdg_dist.engine.transport import HEADER_LEN
from fdg_dist.run import devices, distributed, worker

METHODS = ["fdg", "bp", "ddg", "fr", "dgl", "adl"]


def _meta_batches(cfg):
    def batches(epoch: int, train: bool):
        n = cfg.trainer.batch_size if train else cfg.trainer.eval_batch_size
        size = cfg.data.train_size if train else cfg.data.test_size
        for start in range(0, size, n):
            m = min(n, size - start)
            yield (torch.empty(m, 3, cfg.data.image_size, cfg.data.image_size, device="meta"),
                   torch.empty(m, dtype=torch.int64, device="meta"))
    return batches


@pytest.mark.parametrize("method", METHODS)
def test_the_steady_state_never_reads_a_device_value(method: str) -> None:
    """Two epochs of training and evaluation per module with every tensor on the meta device: any host
    read of a device value between actions would raise here.  Only the caller reads, after the epoch."""
    cfg = small_config(**{"method.name": method, "pipeline.k": 3, "method.accum_steps": 2 if method == "adl" else 1,
                          "logging.log_every_steps": 2})  # the update-ratio measurement runs too
    runs = run_emulated(cfg, device="meta", batches=_meta_batches(cfg))
    assert all(len(r.train) == 2 and len(r.evals) == 2 for r in runs)
    assert runs[-1].train[-1].loss_sum.device.type == "meta"  # still unread: only the epoch end may read it
    assert all(r.stage.steps > 0 for r in runs)


class _DeviceRecorder(TorchDispatchMode):
    """Every tensor any op produces on this thread."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[str, torch.device, torch.dtype, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.made.append((str(func), t.device, t.dtype, tuple(t.shape)))
        return out


def test_every_tensor_the_stage_and_executor_make_is_on_the_stage_device() -> None:
    cfg = small_config(**{"method.name": "fdg", "pipeline.k": 3})
    recorders = {k: _DeviceRecorder() for k in range(3)}
    run_emulated(cfg, device="meta", batches=_meta_batches(cfg), inside=lambda k: recorders[k])
    for k, rec in recorders.items():
        assert len(rec.made) > 100
        elsewhere = [m for m in rec.made if m[1].type != "meta"]
        headers = [m for m in elsewhere if m[2] == torch.int64 and m[3] == (HEADER_LEN,)]
        assert elsewhere == headers, f"module {k} made host tensors: {sorted(set(elsewhere) - set(headers))[:5]}"


class _FakeEvent:
    """A CUDA event on a fake device timeline: ``now[0]`` is that device's current time in seconds."""

    def __init__(self, now: list[float]) -> None:
        self.now, self.t = now, None

    def record(self) -> None:
        self.t = self.now[0]

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return self.t is not None

    def elapsed_time(self, other: _FakeEvent) -> float:
        return (other.t - self.t) * 1e3  # milliseconds, as torch.cuda.Event


def test_on_a_gpu_the_time_split_is_device_time_from_events() -> None:
    """The device clock advances only where the (fake) device works — 10 ms per forward, 20 per backward, 1 per
    step, 5 idling for each message — while the host runs at its own pace: the split is the device's."""
    cfg = small_config(**{"method.name": "fdg", "pipeline.k": 2, "trainer.epochs": 1})
    cost = {"forward": 0.010, "backward": 0.020, "step": 0.001}

    def clock(now: list[float]) -> DeviceClock:
        return DeviceClock(event=lambda: _FakeEvent(now))

    runs = run_emulated(cfg, setup=fake_timeline(cost, 0.005, clock, {}), evaluate=False)
    for k, run in enumerate(runs):
        for e in run.train[0].events:
            kind = e.action.kind.value
            want_wait = 0.005 if (kind == "backward" or (kind == "forward" and k > 0)) else 0.0
            assert e.compute_s == pytest.approx(cost[kind]) and e.wait_s == pytest.approx(want_wait), (k, e.action)
        events = run.train[0].events  # placed on the device's timeline: each starts where the previous ended
        assert all(b.start - a.start == pytest.approx(a.wait_s + a.compute_s) for a, b in zip(events, events[1:]))


def _fake_process_group(monkeypatch, calls: list[str]) -> None:
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda *a: calls.append("destroy"))
    monkeypatch.setattr(distributed.dist.distributed_c10d, "_abort_process_group", lambda *a: calls.append("abort"))


def _fake_worker(monkeypatch, tmp_path, fit) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    ctx = distributed.Context(0, 1, 0, 0, 0, 1, 1, torch.device("cpu"), "nccl", None, None, None, {})
    monkeypatch.setattr(distributed, "init", lambda *a, **kw: ctx)
    monkeypatch.setattr(worker.rendezvous, "check_shared_run_dir", lambda *a: None)

    class Trainer:
        def __init__(self, *a) -> None:
            self.preemption = SimpleNamespace(install=lambda: None)  # no real signal handlers in pytest

        def fit(self):
            return fit()

    monkeypatch.setattr(worker, "Trainer", Trainer)


def test_an_error_aborts_the_process_groups_instead_of_destroying_them(monkeypatch, tmp_path) -> None:
    calls: list[str] = []
    _fake_process_group(monkeypatch, calls)

    def fail():
        raise RuntimeError("lost module 1 (rank 1) while waiting for grad of batch 3")

    _fake_worker(monkeypatch, tmp_path, fail)
    with pytest.raises(RuntimeError, match="lost module 1"):
        worker.run(small_config(**{"pipeline.k": 1}).to_dict(), str(tmp_path))
    assert calls == ["abort"]


def test_a_finished_run_destroys_its_process_groups(monkeypatch, tmp_path) -> None:
    calls: list[str] = []
    _fake_process_group(monkeypatch, calls)
    _fake_worker(monkeypatch, tmp_path, lambda: {"final_test_error": 0.5})
    assert worker.run(small_config(**{"pipeline.k": 1}).to_dict(), str(tmp_path)) == {"final_test_error": 0.5}
    assert calls == ["destroy"]


def _fake_gpus(monkeypatch, setting: dict) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: setting.get("available", True))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: setting.get("count", 4))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: setting.get("bf16", True))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: setting.get("nccl", (2, 30, 7)))


@pytest.mark.parametrize("setting,key,match", [
    ({"available": False}, "dist.backend", "nccl needs CUDA GPUs and torch sees none here"),
    ({"count": 2, "local_rank": 2, "nccl": (2, 21, 5)}, "dist.ranks_per_gpu",
     r"3 processes share 2 GPU\(s\) but torch's NCCL 2.21.5 runs one rank per GPU \(several need NCCL ≥ 2.30"),
    ({"count": 2, "local_rank": 2, "per_gpu": 1}, "dist.ranks_per_gpu",
     r"3 processes on this machine at dist.ranks_per_gpu=1 need 3 GPUs but 2 are visible .*at least 2 or set it"),
    ({"bf16": False, "precision": "bf16"}, "trainer.precision", "has no bfloat16 support; use trainer.precision=fp32"),
])
def test_what_the_machine_cannot_do_is_one_line_at_start(monkeypatch, setting, key, match) -> None:
    _fake_gpus(monkeypatch, setting)
    with pytest.raises(devices.DeviceError, match=match) as err:
        devices.check_device("nccl", setting.get("local_rank", 0), setting.get("precision", "fp32"),
                             ranks_per_gpu=setting.get("per_gpu"))
    assert err.value.key == key
    assert devices.check_device("gloo", 7, "bf16") == torch.device("cpu")


@pytest.mark.parametrize("gpus,world,per_gpu,want", [
    (1, 3, None, [0, 0, 0]),  # one GPU: every rank on it
    (2, 4, None, [0, 1, 0, 1]),  # more ranks than GPUs: round robin, neighbours apart
    (4, 2, None, [0, 1]),  # enough GPUs: one each, as before
    (4, 4, 2, [0, 1, 0, 1]),  # two per GPU asked: two GPUs used, two idle
    (8, 6, 4, [0, 1, 0, 1, 0, 1]),
])
def test_ranks_map_to_cuda_local_rank_mod_the_gpus_in_use(monkeypatch, gpus, world, per_gpu, want) -> None:
    _fake_gpus(monkeypatch, {"count": gpus})
    got = [devices.check_device("nccl", r, "fp32", local_world=world, ranks_per_gpu=per_gpu) for r in range(world)]
    assert got == [torch.device("cuda", i) for i in want]


def test_ranks_sharing_a_gpu_get_nccls_multi_rank_settings_and_keep_the_users(monkeypatch) -> None:
    _fake_gpus(monkeypatch, {"count": 1})
    for name in ("NCCL_MULTI_RANK_GPU_ENABLE", "NCCL_NVLS_ENABLE", "NCCL_MAX_CTAS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NCCL_MAX_CTAS", "3")  # the user's choice wins
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/nonexistent-mps")
    lines = devices.share_gpus(4, None)
    assert os.environ["NCCL_MULTI_RANK_GPU_ENABLE"] == "1" and os.environ["NCCL_NVLS_ENABLE"] == "0"
    assert os.environ["NCCL_MAX_CTAS"] == "3"
    assert lines == ["4 ranks on 1 GPU(s), up to 4 per GPU (NCCL 2.30.7): NCCL_MULTI_RANK_GPU_ENABLE=1 "
                     "NCCL_NVLS_ENABLE=0 NCCL_MAX_CTAS=3; no MPS daemon (nvidia-cuda-mps-control -d starts one): "
                     "the ranks time-slice each GPU"]
    assert devices.sharing_environment(4)["NCCL_MAX_CTAS"] == "4"


def test_one_rank_per_gpu_leaves_the_environment_alone(monkeypatch) -> None:
    _fake_gpus(monkeypatch, {"count": 4})
    monkeypatch.delenv("NCCL_MULTI_RANK_GPU_ENABLE", raising=False)
    assert devices.share_gpus(4, None) == [] and "NCCL_MULTI_RANK_GPU_ENABLE" not in os.environ
    _fake_gpus(monkeypatch, {"count": 0})
    assert devices.share_gpus(4, None) == []  # no GPU at all: check_device names it, not a ZeroDivisionError


def test_under_torchs_agent_nccl_errors_reach_our_transport_instead_of_ending_the_rank(monkeypatch, tmp_path) -> None:
    """The agent sets TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (tear down); the worker sets CleanUpOnly before any
    process group exists, so the watchdog aborts and our transport's error names the lost module."""
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    seen = []
    _fake_process_group(monkeypatch, [])
    _fake_worker(monkeypatch, tmp_path, lambda: {})
    monkeypatch.setattr(distributed, "init", lambda *a, **kw: seen.append(os.environ[worker.ERROR_HANDLING]) or
                        distributed.Context(0, 1, 0, 0, 0, 1, 1, torch.device("cpu"), "nccl", None, None, None, {}))
    worker.run(small_config(**{"pipeline.k": 1}).to_dict(), str(tmp_path))
    assert seen == ["2"]


def test_an_abort_that_hangs_ends_the_process_after_the_grace(monkeypatch) -> None:
    exits: list[int] = []
    monkeypatch.setattr(worker.os, "_exit", exits.append)
    worker.leave_within(lambda: time.sleep(0.5), 0.05)
    assert exits == [1]
    worker.leave_within(lambda: None, 0.05)  # an abort that returns: the timer is cancelled
    time.sleep(0.1)
    assert exits == [1]


@pytest.mark.parametrize("timed", [True, False])
def test_cuda_events_are_recorded_only_for_a_pass_whose_times_are_read(timed: bool) -> None:
    """Three events per action (two per step) while someone reads the times (``on_timed`` or ``record``); none at all for a
    pass nobody times (an evaluation without a trace)."""
    cfg = small_config(**{"method.name": "fdg", "pipeline.k": 2, "trainer.epochs": 1})
    made: list[_FakeEvent] = []

    def event() -> _FakeEvent:
        made.append(_FakeEvent([0.0]))
        return made[-1]

    def setup(k: int, run) -> None:
        run.executor.clock = DeviceClock(event=event)
        run.executor.record = timed

    runs = run_emulated(cfg, setup=setup)
    events = [e for r in runs for e in r.train[0].events + r.evals[0].events]
    steps = sum(e.step is not None for e in events)  # a step waits for nothing: two marks, not three
    passes = 2 * len(runs)  # each pass's clock starts with one mark
    assert len(made) == (3 * len(events) - steps + passes if timed else 0) and (len(events) > 0) == timed
