"""On a real SLURM (tests/slurm/start.sh starts a one-node cluster; .ci/run does): ``sbatch slurm/train.sh``
runs 2-task DDP on CPUs (gloo); a job sent SIGUSR1 mid-run checkpoints, requeues itself, resumes at the
same step and ends with the weights of an uninterrupted job; a Hydra sweep through the SLURM launcher
runs one 2-task job per point; devices that do not match the allocation stop the job with an error."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY
from helpers.launch import environment


def slurm_is_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return proc.returncode == 0 and any(s.strip() in ("idle", "mix", "alloc") for s in proc.stdout.split())


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not slurm_is_up(), reason="no SLURM here: tests/slurm/start.sh")]

RUN = ["experiment=digits_ct", *TINY, "trainer.accelerator=cpu", "trainer.val_check_interval=100", "logger=csv"]
ENV = {
    **environment(threads=1),
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    "PYTHON": sys.executable,
}


def sbatch(logs: Path, *overrides: str, tasks: int = 2) -> str:
    """Submits slurm/train.sh as a user would, resized to this machine (CPUs, no GPUs, minutes)."""
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [
        "sbatch",
        "--parsable",
        f"--ntasks-per-node={tasks}",
        "--cpus-per-task=1",
        "--gpus-per-node=0",
        "--time=20",
        f"--output={logs}/%j.log",
        f"--error={logs}/%j.log",
        "slurm/train.sh",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, check=True)
    return proc.stdout.strip().split(";")[0]


def job_info(job: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait(job: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=400) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        info = job_info(job)
        if info.get("JobState") in states:
            return info
        time.sleep(2)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not reach {states} in {timeout} s: {job_info(job)}")


def weights(run_dir: Path) -> dict:
    state = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    return {k: v for k, v in state["state_dict"].items() if k.startswith(("net.", "ema.", "target_net."))}


STEPS = ["trainer.max_steps=12", "callbacks.checkpoint.every_n_train_steps=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("sbatch")
    job = sbatch(out, *RUN, *STEPS, f"hydra.run.dir={out}/run")
    return out, job, wait(job)


def test_sbatch_runs_two_task_ddp_to_completion(uninterrupted):
    out, job, info = uninterrupted
    log = (out / f"{job}.log").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "Starting with 2 processes" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert (out / "run/checkpoints/last.ckpt").exists()


def test_sigusr1_checkpoints_requeues_and_resumes_exactly(uninterrupted, tmp_path):
    ref_out, _, _ = uninterrupted
    job = sbatch(
        tmp_path,
        *RUN,
        *STEPS,
        "+callbacks.slow._target_=helpers.probes.SlowDown",
        "+callbacks.slow.seconds=0.5",
        "+callbacks.starts._target_=helpers.probes.StartLog",
    )
    run_dir = ROOT / f"outputs/digits_ct/slurm-{job}"  # train.sh's run directory, the same after the requeue
    try:
        end = time.time() + 300
        while not (run_dir / "checkpoints/step0000002.ckpt").exists():
            assert time.time() < end and job_info(job).get("JobState") in ("PENDING", "RUNNING")
            time.sleep(0.5)
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        info = wait(job, states=("PENDING",), timeout=120)
        assert info["Restarts"] == "1" and info["Reason"] in ("BeginTime", "None", "Priority")
        log = (tmp_path / f"{job}.log").read_text()
        wrote = re.search(rf"SIGUSR1 at step (\d+): wrote (\S+); requeueing SLURM job {job}", log)
        step = int(wrote.group(1))
        assert wrote.group(2) == f"{run_dir}/checkpoints/last.ckpt"
        assert f"requeued SLURM job {job}" in log
        assert 2 <= step < 12
        info = wait(job, timeout=400)  # SLURM holds a requeued job for about two minutes
        log = (tmp_path / f"{job}.log").read_text()
        assert info["JobState"] == "COMPLETED", log[-3000:]
        assert (run_dir / "starts.txt").read_text().split() == ["0", str(step)]
        assert f"resuming from {run_dir}/checkpoints/last.ckpt" in log
        resumed, reference = weights(run_dir), weights(ref_out / "run")
        assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_sweep_through_the_slurm_launcher(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "hydra/launcher=slurm",
            "model.optimizer.lr=1e-4,2e-4",
            *RUN,
            "trainer.devices=2",
            "hydra.launcher.gpus_per_node=null",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=20",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for num, lr in (("0", 1e-4), ("1", 2e-4)):
        ckpt = torch.load(tmp_path / num / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == 4 and ckpt["cm_lightning"]["config"]["model"]["optimizer"]["lr"] == lr
    logs = "".join(p.read_text() for p in tmp_path.glob(".submitit/*/*_log.*"))
    assert logs.count("Starting with 2 processes") == 2, logs[-3000:]


def test_devices_larger_than_the_allocation(tmp_path):
    job = sbatch(tmp_path, *RUN, "trainer.devices=4", f"hydra.run.dir={tmp_path}/run")
    info = wait(job, timeout=200)
    log = (tmp_path / f"{job}.log").read_text()
    assert info["JobState"] == "FAILED", log[-3000:]
    assert (
        "error: trainer.devices=4 x trainer.num_nodes=1 = 4 processes, but SLURM started 2 task(s) on 1 node(s)" in log
    ) and "Traceback" not in log
