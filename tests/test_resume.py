"""Exact resume: a run killed with SIGKILL, then stopped by SIGTERM, and restarted each time with the same
output directory ends bit for bit where an uninterrupted run ends: weights, EMA, target network,
optimiser, step and data position. Lightning's epochs are 3 batches and a pass over the data 4, so the kills fall
mid-epoch and the pass ends in the middle of an epoch; with flips."""

import shutil
import signal

import pytest
import torch
from helpers import TINY
from helpers.launch import run_script

from cm_lightning.data.digits import DigitsDataModule
from cm_lightning.data.epoch_sampler import EpochSampler

RUN = [
    "experiment=digits_ct",
    *TINY,
    "data.batch_size=448",
    "trainer.max_steps=7",
    "+trainer.limit_train_batches=3",
    "callbacks.checkpoint.every_n_train_steps=2",
    "trainer.deterministic=true",
    "trainer.accelerator=cpu",
    "data.hflip=true",
]


def load(run_dir, name="last.ckpt"):
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)


def assert_same_training_state(a, b):
    assert a["global_step"] == b["global_step"] and a["DigitsDataModule"] == b["DigitsDataModule"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert {k.split(".")[0] for k in a["state_dict"]} >= {"net", "ema", "target_net"}
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_script("train.py", *RUN, "logger=csv", f"hydra.run.dir={out}")
    return out


def test_sigkill_then_sigterm_resume_exactly(uninterrupted, tmp_path):
    out = [*RUN, "logger=wandb", f"hydra.run.dir={tmp_path}"]
    # SIGKILL when step 5 is done but not saved: the restart redoes it from the step-4 checkpoint.
    killed = run_script(
        "train.py", *out, "+callbacks.kill._target_=helpers.probes.KillAt", "+callbacks.kill.step=5", check=False
    )
    assert killed.returncode == -signal.SIGKILL
    assert load(tmp_path)["global_step"] == 4 and load(tmp_path)["DigitsDataModule"] == {"epoch": 0, "samples": 4 * 448}
    # SIGTERM during step 6: that step is finished and written to last.ckpt, then the run exits cleanly.
    stopped = run_script(
        "train.py",
        *out,
        "+callbacks.kill._target_=helpers.probes.KillAt",
        "+callbacks.kill.step=5",
        "+callbacks.kill.signal_name=SIGTERM",
    )
    log = stopped.stdout + stopped.stderr
    assert "SIGTERM at step 6: wrote" in log and "not requeued" in log, log[-3000:]
    assert load(tmp_path)["global_step"] == 6 and not (tmp_path / "checkpoints/step0000006.ckpt").exists()
    run_script("train.py", *out)
    assert_same_training_state(load(tmp_path), load(uninterrupted))
    # All three starts log to one W&B run.
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 3 and all(name.endswith(run_id) for name in runs), runs


def test_truncated_last_checkpoint_falls_back_to_the_previous(uninterrupted, tmp_path):
    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    last = tmp_path / "checkpoints/last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    proc = run_script("train.py", *RUN, "logger=csv", f"hydra.run.dir={tmp_path}")
    log = proc.stdout + proc.stderr
    assert f"{last} is unreadable, probably truncated or corrupt" in log, log[-3000:]
    assert f"resuming from the previous checkpoint {tmp_path / 'checkpoints/step0000006.ckpt'}" in log
    assert_same_training_state(load(tmp_path), load(uninterrupted))


def test_sampler_resumes_mid_pass_and_starts_the_next_pass_whole():
    full = EpochSampler(50, 5, seed=1, mirror=True)
    epoch0 = list(full)
    assert sorted(i % 50 for i in epoch0) == list(range(50)) and any(i >= 50 for i in epoch0)  # flips drawn
    resumed = EpochSampler(50, 5, seed=1, mirror=True)
    resumed.resume(0, 3)
    assert list(resumed) == epoch0[15:]
    # Lightning starts a new epoch on resuming a run that stopped at max_steps mid-pass: the pass goes on.
    resumed.set_epoch(1)
    assert resumed.epoch == 0 and list(resumed) == epoch0[15:]
    resumed.consumed = full.consumed = 10  # read to its end: the next pass is another order, whole
    resumed.set_epoch(2)
    full.set_epoch(1)
    assert resumed.epoch == full.epoch == 1 and list(resumed) == list(full) != epoch0 and len(resumed) == 50


def test_data_position_is_saved_in_samples_of_the_global_batch():
    dm = DigitsDataModule(batch_size=32, seed=5)
    dm.setup()
    dm.train_dataloader()
    dm.sampler.resume(2, 3)
    state = dm.state_dict()
    assert state == {"epoch": 2, "samples": 96}
    again = DigitsDataModule(batch_size=32, seed=5)
    again.setup()
    again.load_state_dict(state)
    again.train_dataloader()
    assert list(again.sampler) == list(dm.sampler) and again.sampler.epoch == 2
