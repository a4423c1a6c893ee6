"""The paths a user takes, each through the real entry points in a subprocess."""

import csv

import numpy as np
import torch
from helpers import TINY
from helpers.launch import run_script
from PIL import Image


def test_edm_then_cd_then_evaluate(edm_run, cd_run, tmp_path):
    for run in (edm_run, cd_run):
        assert (run / "checkpoints/last.ckpt").is_file()
        assert (run / "samples").is_dir() and list((run / "samples").glob("final_*.png"))
    assert (cd_run / "samples/final_1step.png").is_file() and (cd_run / "samples/final_2step.png").is_file()
    assert (edm_run / "samples/final_18step.png").is_file()
    ckpt = torch.load(cd_run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("target_net.") for k in keys) and any(k.startswith("ema.0.") for k in keys)
    assert not any(k.startswith("target.teacher.") for k in keys)  # the teacher is re-read, not copied
    assert ckpt["global_step"] == 4 and ckpt["optimizer_states"]

    run_script("evaluate.py", f"ckpt={cd_run / 'checkpoints/last.ckpt'}", "num=6", f"hydra.run.dir={tmp_path}")
    for k in (1, 2):
        assert Image.open(tmp_path / f"samples_{k}step.png").size[0] > 8
        arr = np.load(tmp_path / f"samples_{k}step.npz")["arr_0"]
        assert arr.shape == (6, 16, 16, 1) and arr.dtype == np.uint8


def test_ct_logs_its_curriculum(tmp_path):
    run_script("train.py", "experiment=digits_ct", *TINY, "logger=csv", f"hydra.run.dir={tmp_path}")
    rows = list(csv.DictReader(open(tmp_path / "csv/metrics.csv")))
    assert [float(r["train/num_scales"]) for r in rows if r.get("train/num_scales")][0] == 2.0
    assert any(r.get("val/loss") for r in rows)
    assert (tmp_path / "samples/final_1step.png").is_file()


def test_resume_continues_from_the_checkpoint(edm_run, tmp_path):
    """Two more steps from step 4 of a run end with the weights of a run that trained six steps in one go; a run
    that ignored ckpt_path would also reach step 6, from other weights."""
    common = ["experiment=digits_edm", *TINY, "trainer.max_steps=6", "logger=csv"]
    start = edm_run / "checkpoints/last.ckpt"
    run_script("train.py", *common, f"ckpt_path={start}", f"hydra.run.dir={tmp_path / 'resumed'}")
    run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'straight'}")
    resumed, straight, before = (
        torch.load(path, map_location="cpu", weights_only=True)
        for path in (tmp_path / "resumed/checkpoints/last.ckpt", tmp_path / "straight/checkpoints/last.ckpt", start)
    )
    assert resumed["global_step"] == straight["global_step"] == 6
    assert resumed["state_dict"].keys() == straight["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    assert not torch.equal(before["state_dict"]["net.out.2.weight"], straight["state_dict"]["net.out.2.weight"])


def test_wandb_offline_and_tensorboard_loggers(tmp_path):
    run_script(
        "train.py",
        "experiment=digits_ct",
        *TINY,
        "trainer.max_steps=2",
        "logger=wandb",
        f"hydra.run.dir={tmp_path / 'w'}",
    )
    assert list((tmp_path / "w/wandb").glob("offline-run-*"))
    run_script(
        "train.py",
        "experiment=digits_ct",
        *TINY,
        "trainer.max_steps=2",
        "logger=tensorboard",
        f"hydra.run.dir={tmp_path / 't'}",
    )
    assert list((tmp_path / "t/tensorboard").glob("events.*"))
