"""When the process that launched a 2-rank CPU run is killed, its other rank exits too, instead of waiting
forever in a collective for a rank 0 that is gone (``ddp.exit_with_launcher``)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import ROOT, TINY
from helpers.launch import command, environment


def children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for task in tasks.glob("*") for c in (task / "children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process tree from /proc")
@pytest.mark.parametrize("when", ["starting", "training"])
def test_ranks_exit_when_the_launcher_is_killed(when, tmp_path):
    """``starting``: killed as soon as rank 1 exists, while it still imports; it would then wait for the
    rendezvous of a rank 0 that is gone (30 minutes, torch's default timeout). ``training``: killed between
    steps; rank 1 is in the step's collectives."""
    args = command(
        "train.py",
        *TINY,
        "trainer.max_steps=100000",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.val_check_interval=100000",
        "logger=none",
        "+callbacks.start._target_=helpers.probes.StartLog",
        "+callbacks.slow._target_=helpers.probes.SlowDown",
        "+callbacks.slow.seconds=0.2",
        f"hydra.run.dir={tmp_path}",
    )
    launcher = subprocess.Popen(
        args, cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr.txt", "w")
    )
    ranks = []
    try:
        started = (lambda: children(launcher.pid)) if when == "starting" else (tmp_path / "starts.txt").exists
        assert wait_for(started, 300), (tmp_path / "stderr.txt").read_text()[-3000:]
        ranks += children(launcher.pid)
        assert ranks, "the launcher started no rank"
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        assert wait_for(lambda: not any(alive(pid) for pid in ranks), 30), f"ranks {ranks} outlived the launcher"
    finally:  # whatever happened, leave no process of the test behind
        launcher.kill()
        for pid in filter(alive, ranks):
            os.kill(pid, signal.SIGKILL)
