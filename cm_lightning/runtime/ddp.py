"""Several processes on one machine under Hydra, without SLURM: how Lightning starts ranks 1..n-1, and
the clean-up between the jobs of a local ``--multirun``, and ranks that exit with the process that started them.

Lightning starts each further rank by re-running the command line with ``hydra.run.dir`` pinned. Under
``--multirun`` that command line is the whole sweep: every rank would launch a sweep of its own, in
another directory. ``rank_command`` re-runs instead the one job this process is running, in run mode,
with the job's own overrides and output directory. ``job_scope`` undoes what the launch left behind
(the process group, the rank variables in ``os.environ``), so that the next job of the sweep starts its
own ranks rather than waiting for the old ones.
"""

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd, to_absolute_path
from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher

CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")
# Hydra settings that belong to the sweep or are set for the rank below; the others (chdir, logging) carry over.
SWEEP_KEYS = (
    "hydra.mode",
    "hydra.run.",
    "hydra.sweep",
    "hydra.launcher",
    "hydra/launcher",
    "hydra.sweeper",
    "hydra/sweeper",
    "hydra.job.name",
    "hydra.output_subdir",
    "hydra.job.num",
    "hydra.job.id",
)
LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
LAUNCHER_VAR = "CM_LIGHTNING_LAUNCHER_PID"  # set by the process that starts ranks, inherited by them


def config_flags(argv: list[str]) -> list[str]:
    """The ``--config-name``-style flags of a Hydra command line, with their values."""
    flags, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.split("=", 1)[0] in CONFIG_FLAGS:
            take = 1 if "=" in arg else 2
            flags += argv[i : i + take]
            i += take
        else:
            i += 1
    return flags


def rank_command(local_rank: int) -> tuple[list[str], str]:
    """Lightning's ``_hydra_subprocess_cmd`` for the job being run, in run mode (see the module docstring)."""
    import __main__  # the entry point as Python started it: a script, or ``-m module``

    hydra_cfg = HydraConfig.get()
    script = ["-m", __main__.__spec__.name] if __main__.__spec__ else [to_absolute_path(sys.argv[0])]
    carried = [o for o in hydra_cfg.overrides.hydra if not o.lstrip("~+").startswith(SWEEP_KEYS)]
    command = [
        sys.executable,
        *script,
        *config_flags(sys.argv[1:]),
        *hydra_cfg.overrides.task,
        *carried,
        f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"',
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


def use_rank_command() -> None:
    trainer_launcher._hydra_subprocess_cmd = rank_command
    fabric_launcher._hydra_subprocess_cmd = rank_command


@contextlib.contextmanager
def job_scope():
    """Leaves no process group and no rank variables behind when the job ends (see the module docstring)."""
    saved = {k: os.environ.get(k) for k in (*LAUNCH_VARS, LAUNCHER_VAR)}
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def exit_with_launcher() -> None:
    """A rank started by this process's launcher (Lightning re-running the command) exits when the launcher
    dies, instead of waiting forever in a collective for a rank 0 that is gone. Then this process becomes the
    launcher its own ranks watch."""
    launcher = int(os.environ.get(LAUNCHER_VAR) or 0)
    if launcher and launcher != os.getpid():
        if os.getppid() == launcher:
            watch_parent(launcher)
        elif not alive(launcher):  # it died while this rank was starting
            os._exit(1)
    os.environ[LAUNCHER_VAR] = str(os.getpid())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch_parent(parent: int) -> None:
    """On Linux the kernel sends SIGKILL when the parent exits (``PR_SET_PDEATHSIG``; no thread to starve
    while the main one is blocked in C++); elsewhere a daemon thread polls for the parent."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    else:
        threading.Thread(target=poll_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # it died before the request was made
        os._exit(1)


def poll_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)
