"""SLURM: the allocation a run is started in, checked against ``trainer.devices`` and ``num_nodes``
before anything starts (a mismatch would otherwise hang in the first collective), and requeueing.

Lightning takes ranks from SLURM when the job is not interactive and ``srun`` started one task per
device (``--ntasks-per-node`` = devices per node); ``slurm/train.sh`` does that.
"""

import os
import subprocess

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from cm_lightning.errors import ConfigError

FIX = "set them to match, or change #SBATCH --nodes / --ntasks-per-node (slurm/train.sh passes the allocation's)"


def managed() -> bool:
    """True when Lightning will take the ranks from SLURM (a batch job, not ``salloc``/``srun --pty bash``)."""
    return SLURMEnvironment.detect()


def job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for a job array, else the job id."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue() -> str:
    """Puts this job back in the queue (SLURM then ends the running one); a line saying what happened."""
    job = job_id()
    if job is None:
        return "not a SLURM job, so nothing requeues it: restart it with the same hydra.run.dir to resume"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not requeue SLURM job {job} ({exc}); resubmit it with the same hydra.run.dir"
    if done.returncode:
        return f"scontrol requeue {job} failed: {done.stderr.strip()}; resubmit it with the same hydra.run.dir"
    return f"requeued SLURM job {job}"


def count_devices(devices) -> int | None:
    """The processes per node that ``trainer.devices`` asks for, when it says (not ``auto`` or -1)."""
    if isinstance(devices, str):
        if "," in devices:
            return len([d for d in devices.split(",") if d.strip()])
        if not devices.strip().lstrip("-").isdigit():
            return None
        devices = int(devices)
    if isinstance(devices, int):
        return devices if devices > 0 else None
    return len(devices)  # a list of device indices


def wants_gpus(accelerator) -> bool:
    accelerator = str(accelerator or "auto").lower()
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def check_allocation(devices, num_nodes: int = 1, accelerator="auto") -> None:
    """``trainer.devices`` x ``trainer.num_nodes`` processes must be what SLURM started, and there must be
    as many GPUs as devices; otherwise a ConfigError naming both numbers and the fix."""
    per_node, num_nodes = count_devices(devices), int(num_nodes or 1)
    if wants_gpus(accelerator) and per_node is not None and per_node > torch.cuda.device_count():
        seen = torch.cuda.device_count()
        where = (
            f"SLURM gave this node {os.environ['SLURM_GPUS_ON_NODE']}"
            if os.environ.get("SLURM_GPUS_ON_NODE")
            else f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}"
        )
        raise ConfigError(
            f"trainer.devices={devices} but {seen} GPU(s) are visible here ({where}); set "
            f"trainer.devices={seen}, or ask for more (#SBATCH --gpus-per-node)"
            if seen
            else f"trainer.accelerator={accelerator} but no GPU is visible ({where}); "
            "use trainer.accelerator=cpu or run where there is a GPU"
        )
    if not managed():
        return
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS", "1"))
    nodes = int(os.environ.get("SLURM_STEP_NUM_NODES") or os.environ.get("SLURM_JOB_NUM_NODES", "1"))
    if "SLURM_STEP_ID" not in os.environ and (tasks > 1 or (per_node or 1) * num_nodes > 1):
        raise ConfigError(
            f"this SLURM job has {tasks} task(s) but train.py runs in its batch script, not under "
            "srun, so its ranks would wait for each other forever; start it with "
            "`srun python train.py ...` (slurm/train.sh does)"
        )
    if num_nodes != nodes:
        raise ConfigError(f"trainer.num_nodes={num_nodes} but SLURM allocated {nodes} node(s); {FIX}")
    if per_node is not None and per_node * num_nodes != tasks:
        raise ConfigError(
            f"trainer.devices={devices} x trainer.num_nodes={num_nodes} = {per_node * num_nodes} "
            f"processes, but SLURM started {tasks} task(s) on {nodes} node(s) "
            f"(--ntasks-per-node={tasks // max(nodes, 1)}); {FIX}"
        )
