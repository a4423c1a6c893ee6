"""What a cluster user watches while a run trains: images/s, time per optimiser step, peak GPU memory, the
gradient norm, the learning rate (Lightning's LearningRateMonitor, conf/callbacks/default.yaml) and a
progress bar over optimiser steps with the time left."""

import time
from collections import deque

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar, ThroughputMonitor, TQDMProgressBar


def images_in(batch) -> int:
    """Images in a batch: our data modules give (images, labels)."""
    return len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)


class Throughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor over a window of ``window_size`` batches: ``train/device/samples_per_sec``
    (images/s per device) and, with more than one device, ``train/samples_per_sec`` (all devices). Adds what
    it does not measure: ``train/sec_per_step``, the mean time per optimiser step over the last ``window_size``
    steps, and ``train/peak_memory_gib``, the CUDA memory peak so far."""

    def __init__(self, window_size: int = 20):
        super().__init__(batch_size_fn=images_in, window_size=window_size)
        self.step_times: deque = deque(maxlen=window_size)
        self.last_step = self.last_time = None

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if not hasattr(pl_module, "flops_per_batch"):
            pl_module.flops_per_batch = None  # FLOPs are not counted (no MFU); this says so instead of a warning

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == self.last_step:  # gradients are being accumulated
            return
        now = time.perf_counter()
        if self.last_time is not None:
            self.step_times.append(now - self.last_time)
            pl_module.log("train/sec_per_step", sum(self.step_times) / len(self.step_times))
        self.last_step, self.last_time = trainer.global_step, now
        if pl_module.device.type == "cuda":
            pl_module.log("train/peak_memory_gib", torch.cuda.max_memory_allocated(pl_module.device) / 2**30)

    def on_validation_end(self, trainer, pl_module):
        super().on_validation_end(trainer, pl_module)
        self.last_time = None  # validation and sample grids are not a training step's time


class GradNorm(L.Callback):
    """``train/grad_norm``: the 2-norm of all gradients as the optimiser sees them (after AMP unscaling,
    before clipping)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            pl_module.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar over optimiser steps out of ``trainer.max_steps``, with the time left at this
    session's rate, instead of one bar per epoch."""

    def on_train_start(self, trainer, *_):
        super().on_train_start(trainer)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = bar.n = trainer.global_step  # a resumed run: the rate and time left count from here
        bar.set_description("Step")

    def on_train_epoch_start(self, trainer, *_):
        """One bar for the whole run."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = self.train_progress_bar
        if self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar


def usable(callbacks: list, loggers: list, progress_bar: bool) -> list:
    """The callbacks the Trainer accepts: no progress bar with ``trainer.enable_progress_bar=false``, no
    learning-rate monitor without a logger."""
    return [
        c
        for c in callbacks
        if (progress_bar or not isinstance(c, ProgressBar)) and (loggers or not isinstance(c, LearningRateMonitor))
    ]
