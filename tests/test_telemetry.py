"""What a cluster user watches: images/s, time per step, gradient norm and learning rate in the logs, a bar
over optimiser steps with the time left, and evaluate.py's bar in images/s."""

import csv

from helpers import TINY
from helpers.launch import run_script
from lightning.pytorch.callbacks import LearningRateMonitor

from cm_lightning.callbacks.telemetry import StepProgressBar, Throughput, usable


def test_training_logs_throughput_and_shows_steps_out_of_max_steps(tmp_path):
    proc = run_script(
        "train.py",
        *TINY,
        "trainer.enable_progress_bar=true",
        "trainer.max_steps=6",
        "callbacks.throughput.window_size=2",
        "logger=csv",
        f"hydra.run.dir={tmp_path}",
    )
    assert "Step: 100%" in proc.stdout and "6/6 [" in proc.stdout  # steps out of max_steps, elapsed<left
    rows = list(csv.DictReader(open(tmp_path / "csv/metrics.csv")))
    for key in ("train/device/samples_per_sec", "train/sec_per_step", "train/grad_norm", "lr-RAdam"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert values and all(v > 0 for v in values), key
    # 16 images a step: images/s and time per step describe the same steps.
    rate = [float(r["train/device/samples_per_sec"]) for r in rows if r.get("train/device/samples_per_sec")][-1]
    step = [float(r["train/sec_per_step"]) for r in rows if r.get("train/sec_per_step")][-1]
    assert 0.3 < rate * step / 16 < 3


def test_callbacks_the_trainer_would_refuse_are_left_out():
    bar, lr, throughput = StepProgressBar(), LearningRateMonitor(), Throughput()
    assert usable([bar, lr, throughput], [], progress_bar=False) == [throughput]
    assert usable([bar, lr, throughput], ["a logger"], progress_bar=True) == [bar, lr, throughput]


def test_evaluate_shows_images_per_second(cd_run, tmp_path):
    proc = run_script(
        "evaluate.py", f"ckpt={cd_run / 'checkpoints/last.ckpt'}", "num=6", "batch_size=3", f"hydra.run.dir={tmp_path}"
    )
    assert "sampling: 100%" in proc.stderr and "6/6" in proc.stderr and "img/s" in proc.stderr
