"""Stops training at the first NaN or infinite loss, before its gradients reach the weights.

The check runs before the backward pass on every rank and is agreed through one all-reduce, so all
ranks stop at the same step. Nothing is written on the way out: the checkpoints on disk are the last
good ones, and the message names the step and the newest of them.
"""

import lightning as L
import torch

from cm_lightning.callbacks.checkpoint import checkpoint_dir, latest_readable
from cm_lightning.errors import TrainingError


class NonFiniteLoss(TrainingError):
    """A NaN or infinite training loss; the message names the step and the last good checkpoint."""


class FiniteLoss(L.Callback):
    def on_before_backward(self, trainer, pl_module, loss):
        bad = not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        last = latest_readable(checkpoint_dir(trainer))
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        value = f"{loss.item()}" if bad else "non-finite on another rank"
        raise NonFiniteLoss(
            f"the training loss is {value} at step {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"training stopped before this step changed the weights and {kept}. Lower model.optimizer.lr, "
            "set trainer.gradient_clip_val, or check the data; resume with ckpt_path=auto"
        )
