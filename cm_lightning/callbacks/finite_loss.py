"""Stops training at the first NaN or infinite loss, before its gradients reach the weights.

The check runs before the backward pass on every rank and is agreed through one all-reduce, so all
ranks stop at the same step. Nothing is written on the way out. A loss rarely jumps from normal to NaN:
it climbs first, and the checkpoints written while it climbed hold finite weights that diverge again on
resume. So each checkpoint carries the smoothed loss at its step (this callback's state), and the
message names the newest checkpoint whose smoothed loss was within ``diverged_factor`` of the median over
the run's checkpoints (consistency losses do not only fall, so not of the lowest), not merely the newest
file.

Under fp16 with a loss scaler (``trainer.precision=16-mixed``) an overflow is expected now and then: the
scaler skips that step and lowers its scale, so the weights never see it. Up to ``fp16_patience``
consecutive non-finite steps are left to the scaler; more than that is a real divergence and stops.
"""

import math
import statistics
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from cm_lightning.callbacks.checkpoint import checkpoint_dir, newest_first
from cm_lightning.errors import TrainingError
from cm_lightning.untrusted import UnloadableFile, load_file


class NonFiniteLoss(TrainingError):
    """A NaN or infinite training loss; the message names the step and the last good checkpoint."""


def loss_scaler(trainer):
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None)


class FiniteLoss(L.Callback):
    def __init__(self, fp16_patience: int = 20, diverged_factor: float = 10.0, smoothing: float = 0.9):
        self.fp16_patience = fp16_patience
        self.diverged_factor, self.smoothing = diverged_factor, smoothing
        self.skipped = 0
        self.smoothed = None

    def state_dict(self) -> dict:
        return {"smoothed": self.smoothed}

    def load_state_dict(self, state_dict: dict) -> None:
        self.smoothed = state_dict.get("smoothed")

    def track(self, loss: float) -> None:
        """An exponential moving average of the loss."""
        s = self.smoothing
        self.smoothed = loss if self.smoothed is None else s * self.smoothed + (1 - s) * loss

    def on_before_backward(self, trainer, pl_module, loss):
        bad = not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            self.skipped = 0
            self.track(float(loss.detach().mean()))
            return
        if loss_scaler(trainer) is not None and self.skipped < self.fp16_patience:
            # Non-finite gradients follow, so the scaler skips this step and halves its scale.
            self.skipped += 1
            rank_zero_warn(
                f"non-finite fp16 loss at step {trainer.global_step}: the loss scaler skips the step "
                f"({self.skipped} in a row, at most {self.fp16_patience})"
            )
            return
        kept, resume = self.advice(checkpoint_dir(trainer))
        value = f"{loss.item()}" if bad else "non-finite on another rank"
        raise NonFiniteLoss(
            f"the training loss is {value} at step {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"training stopped before this step changed the weights and {kept}. Lower model.optimizer.lr, "
            f"set trainer.gradient_clip_val, or check the data; {resume}"
        )

    def advice(self, dirpath) -> tuple[str, str]:
        """What the message says was kept, and how to go on from it."""
        good, passed_over = self.last_good(dirpath)
        if good is not None:
            how = f"ckpt_path={good}" if passed_over else "ckpt_path=auto"
            return f"the last good checkpoint is {good}{passed_over}", f"resume with {how}"
        if passed_over:
            return (
                f"no checkpoint from before the divergence is left{passed_over}",
                "start afresh with ckpt_path=null overwrite=true",
            )
        return "no checkpoint had been written yet", "resume with ckpt_path=auto"

    def last_good(self, dirpath) -> tuple[Path | None, str]:
        """The newest readable checkpoint written before the loss diverged (see the module docstring), and
        what was passed over on the way to it."""
        found = [(path, smoothed_loss(path)) for path in newest_first(dirpath)]
        found = [(path, loss) for path, loss in found if loss is not False]
        known = [loss for _, loss in found if loss is not None]
        typical = statistics.median(known) if known else math.inf
        skipped = []
        for path, loss in found:
            if loss is None or loss <= self.diverged_factor * typical:
                return path, passed_over(skipped, self.diverged_factor, typical)
            skipped.append((path, loss))
        return None, passed_over(skipped, self.diverged_factor, typical)


def smoothed_loss(path: Path):
    """The smoothed loss a checkpoint was written at; None when it does not say, False when unreadable."""
    try:
        ckpt = load_file(path, "checkpoint", mmap=True)
    except UnloadableFile:
        return False
    return ((ckpt.get("callbacks") or {}).get(FiniteLoss.__qualname__) or {}).get("smoothed")


def passed_over(skipped: list, factor: float, typical: float) -> str:
    if not skipped:
        return ""
    losses = "; ".join(f"{path.name}: {loss:.4g}" for path, loss in skipped)
    return (
        f" (newer checkpoints were already diverging, their smoothed loss above {factor} x the median "
        f"{typical:.4g} of the run's checkpoints: {losses})"
    )
