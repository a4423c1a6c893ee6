"""What every generator trained here shares: optimiser with warm-up, EMAs of the weights, per-step
seeding, checkpoint metadata and the sampler. EDM (the teacher) and every consistency method
subclass it and only write their loss.
"""

import copy
import dataclasses

import lightning as L
import torch
from torch import nn

from cm_lightning import seeding
from cm_lightning.checkpoints import META_KEY
from cm_lightning.diffusion.precond import Precond
from cm_lightning.ema import ema_update_
from cm_lightning.sampler import Sampler
from cm_lightning.speed import Speed


class GenerativeModule(L.LightningModule):
    kind = ""

    def __init__(
        self,
        net: nn.Module,
        precond: Precond,
        optimizer,
        ema_rates=(0.9999,),
        sample_ema: int = 0,
        warmup_steps: int = 0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        seed: int = 0,
        ema_warmup: bool = False,
        speed: Speed | None = None,
    ):
        super().__init__()
        if not ema_rates:
            raise ValueError("model.ema_rates is empty; give at least one rate, e.g. [0.9999]")
        if not 0 <= sample_ema < len(ema_rates):
            raise ValueError(f"model.sample_ema={sample_ema} is not an index into model.ema_rates={list(ema_rates)}")
        self.net = net
        self.precond = precond
        self.optimizer_factory = optimizer
        self.ema_rates = [float(r) for r in ema_rates]
        self.ema = nn.ModuleList(copy.deepcopy(net).requires_grad_(False) for _ in self.ema_rates)
        self.sample_ema = sample_ema
        self.ema_warmup = ema_warmup
        self.warmup_steps = warmup_steps
        self.grid = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
        self.seed = seed
        self.speed = speed or Speed()
        self.run_config = None  # set by the entry point; stored in checkpoints for evaluate.py
        # Parts rebuilt from the config rather than saved (a frozen teacher, LPIPS): prefixes of their keys.
        self.frozen_prefixes: tuple[str, ...] = ()

    # --- randomness -------------------------------------------------------------------------
    def step_generator(self, batch_idx: int, stream: int = 0) -> torch.Generator:
        """Same on every rank: a function of (seed, optimiser step, micro-batch, stream) only."""
        micro = batch_idx % max(1, self.trainer.accumulate_grad_batches) if self._trainer else 0
        return seeding.generator(self.device, self.seed, self.global_step, micro, stream)

    def seed_dropout(self, batch_idx: int) -> None:
        """Per-rank dropout seed; re-applied so that student and target draw the same masks."""
        micro = batch_idx % max(1, self.trainer.accumulate_grad_batches) if self._trainer else 0
        torch.manual_seed(seeding.mix(self.seed, self.global_step, micro, self.global_rank, 7))

    def global_draw(self, local: int, fn):
        """Draws with ``fn(global_batch)`` for the whole global batch and keeps this rank's rows, so
        each sample's noise depends on its position in the global batch, not on the number of ranks."""
        world = self.trainer.world_size if self._trainer else 1
        rank = self.global_rank if self._trainer else 0
        out = fn(local * world)
        if isinstance(out, tuple):
            return tuple(o[rank * local : (rank + 1) * local] for o in out)
        return out[rank * local : (rank + 1) * local]

    def labels_for(self, labels):
        return labels if getattr(self.net, "num_classes", 0) else None

    # --- speed ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Memory format and compilation, before the strategy moves the module and wraps it for DDP (so that
        DDP's gradient buckets are laid out like the final parameters)."""
        self.speed = self.speed.resolved(self.trainer.strategy.root_device)
        self.speed.prepare(self.net)
        if self.speed.channels_last:  # the EMAs only sample now and then: their memory format, not compiled
            self.ema.to(memory_format=torch.channels_last)

    # --- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self):
        opt = self.speed.optimizer(self.optimizer_factory, self.net.parameters(), self.trainer.strategy.root_device)
        if not self.warmup_steps:
            return opt
        warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warm, "interval": "step"}}

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()

    def ema_rate(self, rate: float) -> float:
        """With ``ema_warmup`` the rate is min(rate, (1 + k) / (10 + k)) at step k, so that short runs are
        not dominated by the initial weights; the published runs use the plain rate."""
        if not self.ema_warmup:
            return rate
        k = self.global_step
        return min(rate, (1 + k) / (10 + k))

    def after_optimizer_step(self) -> None:
        for rate, ema in zip(self.ema_rates, self.ema):
            ema_update_(ema, self.net, self.ema_rate(rate))

    # --- sampling ---------------------------------------------------------------------------
    def sampler(self, ema: int | None = None) -> Sampler:
        net = self.ema[self.sample_ema if ema is None else ema]
        return Sampler(net.eval(), self.precond, self.kind, **self.grid)

    # --- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(self.frozen_prefixes)
        }
        checkpoint[META_KEY] = {
            "config": self.run_config,
            "kind": self.kind,
            "precond": dataclasses.asdict(self.precond),
            "ema_rates": self.ema_rates,
            "sample_ema": self.sample_ema,
            "grid": self.grid,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        own = self.state_dict()
        checkpoint["state_dict"].update({k: v for k, v in own.items() if k.startswith(self.frozen_prefixes)})
