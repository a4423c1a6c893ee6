"""Stops training at the first NaN or infinite loss, before its gradients reach the weights.

The check runs before the backward pass on every rank and is agreed through one all-reduce, so all
ranks stop at the same step. Nothing is written on the way out: the checkpoints on disk are the last
good ones, and the message names the step and the newest of them.

Under fp16 with a loss scaler (``trainer.precision=16-mixed``) an overflow is expected now and then: the
scaler skips that step and lowers its scale, so the weights never see it. Up to ``fp16_patience``
consecutive non-finite steps are left to the scaler; more than that is a real divergence and stops.
"""

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from cm_lightning.callbacks.checkpoint import checkpoint_dir, latest_readable
from cm_lightning.errors import TrainingError


class NonFiniteLoss(TrainingError):
    """A NaN or infinite training loss; the message names the step and the last good checkpoint."""


def loss_scaler(trainer):
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None)


class FiniteLoss(L.Callback):
    def __init__(self, fp16_patience: int = 20):
        self.fp16_patience = fp16_patience
        self.skipped = 0

    def on_before_backward(self, trainer, pl_module, loss):
        bad = not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            self.skipped = 0
            return
        if loss_scaler(trainer) is not None and self.skipped < self.fp16_patience:
            # Non-finite gradients follow, so the scaler skips this step and halves its scale.
            self.skipped += 1
            rank_zero_warn(f"non-finite fp16 loss at step {trainer.global_step}: the loss scaler skips the step "
                           f"({self.skipped} in a row, at most {self.fp16_patience})")
            return
        last = latest_readable(checkpoint_dir(trainer))
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        value = f"{loss.item()}" if bad else "non-finite on another rank"
        raise NonFiniteLoss(
            f"the training loss is {value} at step {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"training stopped before this step changed the weights and {kept}. Lower model.optimizer.lr, "
            "set trainer.gradient_clip_val, or check the data; resume with ckpt_path=auto"
        )
