"""Bad input and faults: each stops early with a message that names the value and the fix, or is
survived: devices that do not match the SLURM allocation, a global batch that does not split over the
ranks, an unwritable checkpoint directory, an unreadable checkpoint, a NaN or inf loss, a SIGKILL
in the middle of writing a checkpoint. (The fallback from a truncated last.ckpt: test_resume.py.)"""

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, TINY
from helpers.launch import run_script

from cm_lightning.callbacks.checkpoint import check_writable, latest_readable, resume_path, unreadable
from cm_lightning.callbacks.finite_loss import FiniteLoss, NonFiniteLoss
from cm_lightning.errors import ConfigError
from cm_lightning.runtime.slurm import check_allocation

SLURM_STEP = {
    "SLURM_NTASKS": "2",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_NUM_NODES": "1",
    "SLURM_STEP_ID": "0",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURM_JOB_NAME": "train.sh",
    "SLURM_JOB_ID": "7",
    "SLURM_PROCID": "0",
}


def fails(*overrides, code: int = 2) -> str:
    proc = run_script("train.py", *TINY, "trainer.accelerator=cpu", *overrides, check=False)
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.parametrize(
    "devices, nodes, match",
    [
        (4, 1, r"trainer.devices=4 x trainer.num_nodes=1 = 4 processes, but SLURM started 2 task\(s\)"),
        (2, 2, r"trainer.num_nodes=2 but SLURM allocated 1 node"),
    ],
)
def test_devices_that_do_not_match_the_allocation(monkeypatch, devices, nodes, match):
    for key, value in SLURM_STEP.items():
        monkeypatch.setenv(key, value)
    check_allocation(2, 1, "cpu")
    with pytest.raises(ConfigError, match=match):
        check_allocation(devices, nodes, "cpu")


def test_several_tasks_outside_srun(monkeypatch):
    for key, value in SLURM_STEP.items():
        if key.startswith("SLURM_STEP"):
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="not under srun"):
        check_allocation(2, 1, "cpu")


def test_more_gpus_than_visible():
    with pytest.raises(ConfigError, match=r"trainer.devices=\d+ but \d+ GPU|no GPU is visible"):
        check_allocation(torch.cuda.device_count() + 1, 1, "gpu")


def test_batch_that_does_not_split_over_the_ranks(tmp_path):
    err = fails("trainer.devices=2", "data.batch_size=15", "logger=none", f"hydra.run.dir={tmp_path}")
    assert "data.batch_size=15 (the global batch) is not divisible by devices x nodes x" in err
    assert not (tmp_path / "train_ddp_process_1.log").exists() and not list(tmp_path.rglob("*.ckpt"))


def test_checkpoint_directory_that_is_not_writable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="is not writable"):
        check_writable(blocker / "checkpoints")
    err = fails(f"callbacks.checkpoint.dirpath={blocker}/checkpoints", "logger=none", f"hydra.run.dir={tmp_path}")
    assert f"callbacks.checkpoint.dirpath={blocker}/checkpoints is not writable" in err and "Epoch" not in err


def test_unreadable_checkpoints(tmp_path):
    good, bad = tmp_path / "step0000002.ckpt", tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "global_step": 2}, good)
    bad.write_bytes(good.read_bytes()[:100])
    assert latest_readable(tmp_path) == good and resume_path("auto", tmp_path) == str(good)
    with pytest.raises(ConfigError, match=r"ckpt_path=.*last.ckpt cannot be read .*ckpt_path=auto"):
        resume_path(bad, tmp_path)
    good.unlink()
    with pytest.raises(ConfigError, match="no checkpoint in .* can be read"):
        resume_path("auto", tmp_path)
    assert resume_path("auto", tmp_path / "new_run") is None and resume_path(None, tmp_path) is None


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_loss_names_the_step(value, tmp_path):
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(reduce_boolean_decision=lambda d, all: d),
        global_step=12,
        current_epoch=0,
        checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path)),
    )
    FiniteLoss().on_before_backward(trainer, None, torch.tensor(1.0))
    with pytest.raises(NonFiniteLoss, match=f"loss is {value} at step 12 .*no checkpoint had been written"):
        FiniteLoss().on_before_backward(trainer, None, torch.tensor(value))


def test_nan_loss_names_the_checkpoint_from_before_the_divergence(tmp_path):
    """The loss climbed before it became NaN: last.ckpt (smoothed loss 50) is finite but already diverged,
    so the message names step 4 (1.1, within 10x of the median 1.1) and resuming from it."""
    for i, (name, smoothed) in enumerate([("step0000002.ckpt", 1.0), ("step0000004.ckpt", 1.1), ("last.ckpt", 50.0)]):
        torch.save(
            {"state_dict": {}, "global_step": 2 * i + 2, "callbacks": {"FiniteLoss": {"smoothed": smoothed}}},
            tmp_path / name,
        )
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(reduce_boolean_decision=lambda d, all: d),
        global_step=7,
        current_epoch=0,
        checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path)),
    )
    with pytest.raises(NonFiniteLoss) as info:
        FiniteLoss().on_before_backward(trainer, None, torch.tensor(math.nan))
    message = str(info.value)
    good = tmp_path / "step0000004.ckpt"
    assert f"the last good checkpoint is {good} (newer checkpoints were already diverging" in message
    assert "last.ckpt: 50" in message and f"resume with ckpt_path={good}" in message and "\n" not in message


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    err = fails(
        "callbacks.checkpoint.every_n_train_steps=2",
        "+callbacks.poison._target_=helpers.probes.PoisonAt",
        "+callbacks.poison.step=3",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
        code=1,
    )
    last = tmp_path / "checkpoints/last.ckpt"
    assert "error: the training loss is nan at step 3 (epoch 0)" in err and f"last good checkpoint is {last}" in err
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "global_step": 4}, path)
    before = path.read_bytes()
    code = (
        "import torch; from helpers.probes import kill_during_writes; kill_during_writes(); "
        "from cm_lightning.callbacks.checkpoint import AtomicCheckpointIO; "
        "AtomicCheckpointIO().save_checkpoint({'state_dict': {'w': torch.ones(10**6)}, 'global_step': 6}, "
        f"'{path}')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT / "tests",
        env={"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    (partial,) = tmp_path.glob(".last.ckpt.*.partial")
    assert partial.stat().st_size > 0 and unreadable(partial)  # killed halfway through the new file...
    assert path.read_bytes() == before and latest_readable(tmp_path) == path  # ...the previous one is untouched
