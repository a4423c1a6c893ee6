"""DDP that is correct, not just running: two CPU processes (gloo) take the same optimiser step as one
process with the whole global batch, each rank on its own slice of data and noise, with the EMA and
the target network identical on every rank; and a local --multirun of DDP jobs runs each job once."""

import json

import pytest
import torch
from helpers import TINY
from helpers.launch import run_script

from cm_lightning.data.epoch_sampler import EpochSampler
from cm_lightning.runtime.ddp import config_flags
from cm_lightning.runtime.slurm import count_devices

ONE_STEP = [
    "experiment=digits_ct",
    *TINY,
    "trainer.max_steps=1",
    "trainer.accelerator=cpu",
    "trainer.deterministic=true",
    "logger=csv",
    "+callbacks.probe._target_=helpers.probes.RankProbe",
]


def weights(run_dir):
    state = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith(("net.", "ema.", "target_net."))}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One sweep of three jobs in one process: DDP on 2 ranks, a single process, DDP again."""
    out = tmp_path_factory.mktemp("sweep")
    proc = run_script("train.py", "-m", *ONE_STEP, "trainer.devices=2,1,2", f"hydra.sweep.dir={out}", timeout=400)
    return out, proc.stdout + proc.stderr


def test_two_ranks_take_the_single_process_step(sweep):
    out, _ = sweep
    ddp, single = weights(out / "0"), weights(out / "1")
    assert ddp.keys() == single.keys() and any(k.startswith("target_net.") for k in ddp)
    for key in ddp:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-6, msg=key)


def test_ranks_split_the_batch_and_agree_on_ema_and_target(sweep):
    out, _ = sweep
    ranks = json.loads((out / "0" / "probe.json").read_text())
    (single,) = json.loads((out / "1" / "probe.json").read_text())
    assert len(ranks) == 2
    assert ranks[0]["weights"] == ranks[1]["weights"]  # net, EMA and target identical on both ranks
    assert ranks[0]["batches"] != ranks[1]["batches"]  # different data on each rank...
    together = ranks[0]["batches"][0] + ranks[1]["batches"][0]
    assert together == pytest.approx(single["batches"][0], abs=1e-6)  # ...that make up the global batch


def test_local_multirun_under_ddp_runs_each_job_once(sweep):
    out, log = sweep
    assert log.count("Launching 3 jobs locally") == 1, log[-3000:]  # no rank started a sweep of its own
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1", "2"]
    assert (out / "0" / "train_ddp_process_1.log").exists() and not (out / "1" / "train_ddp_process_1.log").exists()
    first, again = weights(out / "0"), weights(out / "2")  # the second DDP job got fresh ranks, same result
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_devices_are_counted_from_any_form():
    assert [count_devices(d) for d in (2, "2", "0,1,3", [0, 1], "auto", -1)] == [2, 2, 3, 2, None, None]


def test_ranks_read_slices_of_the_same_global_batches():
    single = list(EpochSampler(100, 8, seed=3))
    ranks = [list(EpochSampler(100, 4, seed=3, rank=r, world_size=2)) for r in range(2)]
    per_batch = [ranks[0][i : i + 4] + ranks[1][i : i + 4] for i in range(0, len(ranks[0]), 4)]
    assert sum(per_batch, []) == single and len(single) == 96 and len(set(single)) == 96


def test_ranks_keep_the_config_flags_of_the_command_line():
    argv = ["-m", "--config-name", "train", "seed=1,2", "-cp=conf", "--config-dir", "/x", "trainer.devices=2"]
    assert config_flags(argv) == ["--config-name", "train", "-cp=conf", "--config-dir", "/x"]
