"""Callbacks that the tests add to a real ``python train.py`` run (``+callbacks.<name>._target_=helpers.probes.X``;
``helpers.launch`` puts tests/ on its PYTHONPATH) to inject a fault at a chosen step or to record what each rank
did."""

import json
import math
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io import torch_io


class KillAt(L.Callback):
    """SIGKILL (or another signal) to this process when optimiser step ``step`` is about to start."""

    def __init__(self, step: int, signal_name: str = "SIGKILL"):
        self.step, self.signum = step, getattr(signal, signal_name)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class PoisonAt(L.Callback):
    """Turns the inputs of step ``step`` into ``value`` (NaN or inf), so that its loss is not finite."""

    def __init__(self, step: int, value: float = math.nan):
        self.step, self.value = step, value

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch[0].fill_(self.value)


class SlowDown(L.Callback):
    """Sleeps after each step, so that a test has time to signal a job in the middle of its run."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


class StartLog(L.Callback):
    """Appends the step each start of the run begins at to ``starts.txt`` in the run directory."""

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            with open(Path(trainer.default_root_dir) / "starts.txt", "a") as f:
                f.write(f"{trainer.global_step}\n")


class RankProbe(L.Callback):
    """Writes ``probe.json`` in the run directory: every rank's training batches (their sums) and a
    checksum of its net, EMAs and target network at the end, gathered on rank 0."""

    def __init__(self):
        self.batch_sums = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_sums.append(float(batch[0].double().sum()))

    def on_train_end(self, trainer, pl_module):
        parts = {name: getattr(pl_module, name) for name in ("net", "ema", "target_net")}
        sums = [float(sum(p.double().sum() * (i + 1) for i, p in enumerate(m.parameters()))) for m in parts.values()]
        local = torch.tensor([sums + self.batch_sums], dtype=torch.float64, device=pl_module.device)
        gathered = trainer.strategy.all_gather(local).reshape(trainer.world_size, -1).cpu().tolist()
        if trainer.is_global_zero:
            ranks = [{"weights": dict(zip(parts, row[:3])), "batches": row[3:]} for row in gathered]
            (Path(trainer.default_root_dir) / "probe.json").write_text(json.dumps(ranks))


class BatchRows(L.Callback):
    """Writes ``batch_rows_<rank>.pt`` in the run directory: the training inputs this rank was given, all its
    batches' rows in order, so that a test can tell which rows of a dataset each rank read."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append(batch[0].detach().cpu().clone())

    def on_train_end(self, trainer, pl_module):
        torch.save(torch.cat(self.rows), Path(trainer.default_root_dir) / f"batch_rows_{trainer.global_rank}.pt")


def write_then_kill(checkpoint, filepath) -> None:
    """Lightning's checkpoint write, killed with SIGKILL when half of the bytes are on disk."""
    import io

    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    data = buffer.getvalue()
    with open(filepath, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


def kill_during_writes() -> None:
    torch_io._atomic_save = write_then_kill
