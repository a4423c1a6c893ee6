"""The one LightningModule that trains every method: optimiser with warm-up, EMAs of the weights, the target
network, per-step seeding, checkpoint metadata and the sampler. The method is the objective
(``diffusion/objectives/``), which supplies the loss; nothing here depends on which one it is.
"""

import copy

import lightning as L
import torch
from torch import nn

from cm_lightning.checkpoint import META_KEY, metadata
from cm_lightning.diffusion.objectives.base import Objective, StepContext
from cm_lightning.errors import ConfigError
from cm_lightning.loading import load_matching, load_teacher
from cm_lightning.modules.ema import ema_update_, power_beta, std_to_gamma
from cm_lightning.runtime import seeding
from cm_lightning.runtime.speed import Speed
from cm_lightning.sampler import Sampler


class GenerativeModule(L.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        objective: Objective,
        optimizer,
        ema_rates=(0.9999,),
        ema_stds=(),
        sample_ema: int = 0,
        warmup_steps: int = 0,
        lr_decay_ref: int | None = None,
        seed: int = 0,
        ema_warmup: bool = False,
        speed: Speed | None = None,
        teacher_ckpt: str | None = None,
        init_from_teacher: bool = False,
    ):
        super().__init__()
        if not ema_rates and not ema_stds:
            raise ConfigError("model.ema_rates and model.ema_stds are empty; give at least one rate, e.g. [0.9999]")
        if not 0 <= sample_ema < len(ema_rates) + len(ema_stds):
            raise ConfigError(
                f"model.sample_ema={sample_ema} is not an index into model.ema_rates={list(ema_rates)} followed by "
                f"model.ema_stds={list(ema_stds)}"
            )
        self.net = net
        self.objective = objective
        self.optimizer_factory = optimizer
        self.ema_rates = [float(r) for r in ema_rates]
        # EDM2's power-function EMAs, after the constant-rate ones in self.ema; each kept as its exponent gamma.
        self.ema_stds = [float(s) for s in ema_stds]
        self.ema_gammas = [std_to_gamma(s) for s in self.ema_stds]
        self.sample_ema = sample_ema
        self.ema_warmup = ema_warmup
        self.warmup_steps = warmup_steps
        if lr_decay_ref is not None and lr_decay_ref < 1:
            raise ConfigError(f"model.lr_decay_ref={lr_decay_ref}: a positive step count (EDM2's t_ref), or null")
        self.lr_decay_ref = lr_decay_ref
        self.seed = seed
        self.speed = speed or Speed()
        self.run_config = None  # set by the entry point; stored in checkpoints for evaluate.py
        if objective.requires_teacher or init_from_teacher:
            teacher = load_teacher(teacher_ckpt, like=self.net, sigma_data=objective.parameterisation.sigma_data)
            self._check_teacher(teacher, init_from_teacher)
            if objective.requires_teacher:
                objective.attach_teacher(teacher)
        objective.check(self.net)  # here, not in setup: a run that cannot train stops before its directory is made
        # The target network theta^- and the EMAs start equal to theta (after any initialisation from the teacher).
        self.target_net = copy.deepcopy(self.net).requires_grad_(False) if objective.has_target_network else None
        self.ema = nn.ModuleList(copy.deepcopy(self.net).requires_grad_(False) for _ in self.ema_rates + self.ema_stds)
        self.mu = 0.0
        # Parts rebuilt from the config rather than saved (a frozen teacher, LPIPS): prefixes of their keys.
        self.frozen_prefixes = tuple(f"objective.{p}" for p in objective.frozen)

    @property
    def parameterisation(self):
        return self.objective.parameterisation

    def _check_teacher(self, teacher, init_from_teacher: bool) -> None:
        for attr in ("image_size", "in_channels", "num_classes"):
            mine, theirs = getattr(self.net, attr, None), getattr(teacher.net, attr, None)
            if mine != theirs:
                raise ConfigError(
                    f"the teacher's net.{attr}={theirs} differs from this run's net.{attr}={mine}; "
                    "use a teacher trained on the same data and image size"
                )
        if init_from_teacher:
            mine, theirs = getattr(self.parameterisation, "noise_kind", None), teacher.parameterisation.noise_kind
            if mine != theirs:
                raise ConfigError(
                    f"the student would start from the teacher's weights fed another conditioning: noise_kind={mine} "
                    f"here, {theirs} for the teacher; set net.noise_kind={theirs} (or model.init_from_teacher=false)"
                )
            load_matching(
                self.net,
                teacher.net.state_dict(),
                "the teacher checkpoint (model.teacher_ckpt)",
                "The student starts from the teacher's weights, so its net config must equal the teacher's; "
                "use the teacher run's net settings or set model.init_from_teacher=false",
            )

    # --- randomness -------------------------------------------------------------------------
    def _micro(self, batch_idx: int) -> int:
        return batch_idx % max(1, self.trainer.accumulate_grad_batches) if self._trainer else 0

    def step_generator(self, batch_idx: int, stream: int = 0) -> torch.Generator:
        """Same on every rank: a function of (seed, optimiser step, micro-batch, stream) only."""
        return seeding.generator(self.device, self.seed, self.global_step, self._micro(batch_idx), stream)

    def seed_dropout(self, batch_idx: int) -> None:
        """Per-rank dropout seed; re-applied so that student and target draw the same masks."""
        torch.manual_seed(seeding.mix(self.seed, self.global_step, self._micro(batch_idx), self.global_rank, 7))

    def global_draw(self, local: int, fn):
        """Draws with ``fn(global_batch)`` for the whole global batch and keeps this rank's rows, so
        each sample's noise depends on its position in the global batch, not on the number of ranks."""
        world = self.trainer.world_size if self._trainer else 1
        rank = self.global_rank if self._trainer else 0
        out = fn(local * world)
        if isinstance(out, tuple):
            return tuple(o[rank * local : (rank + 1) * local] for o in out)
        return out[rank * local : (rank + 1) * local]

    def context(self, batch_idx: int) -> StepContext:
        return StepContext(
            self.global_step, self.step_generator(batch_idx), self.global_draw, lambda: self.seed_dropout(batch_idx)
        )

    def labels_for(self, labels):
        return labels if getattr(self.net, "num_classes", 0) else None

    # --- the step ---------------------------------------------------------------------------
    def losses(self, x0, labels, batch_idx: int):
        """Per-sample losses of the objective and its extra values to log."""
        return self.objective.loss(self.net, self.target_net, x0, self.labels_for(labels), self.context(batch_idx))

    def training_step(self, batch, batch_idx):
        losses, extra = self.losses(*batch, batch_idx)
        loss = losses.mean()
        state = self.objective.state(self.global_step)
        self.mu = state.get("mu", 0.0)  # applied to the target network once this step's update is done
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in extra.items()})
        self.log_dict({f"train/{k}": float(v) for k, v in state.items()})
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.losses(*batch, batch_idx)[0].mean(), sync_dist=True)

    # --- speed ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Memory format and compilation, before the strategy moves the module and wraps it for DDP (so that
        DDP's gradient buckets are laid out like the final parameters)."""
        self.speed = self.speed.resolved(self.trainer.strategy.root_device)
        self.speed.prepare(self.net)
        if self.speed.channels_last:  # the EMAs only sample now and then: their memory format, not compiled
            self.ema.to(memory_format=torch.channels_last)
        if self.target_net is not None:
            self.speed.prepare(self.target_net)
        if self.objective.teacher is not None:
            self.speed.prepare(self.speed.frozen(self.objective.teacher.net, self.trainer.precision))

    # --- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self):
        """The student's weights and the objective's own (sCM's learned weighting), in one optimiser."""
        params = list(self.net.parameters()) + [p for p in self.objective.parameters() if p.requires_grad]
        opt = self.speed.optimizer(self.optimizer_factory, params, self.trainer.strategy.root_device)
        if not self.warmup_steps and not self.lr_decay_ref:
            return opt
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then, with ``lr_decay_ref``, EDM2's inverse square root decay
        1 / sqrt(max(step / t_ref, 1)) (Karras et al. 2024, eq. 17; sCM's ImageNet runs)."""
        factor = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.lr_decay_ref:
            factor /= max(step / self.lr_decay_ref, 1.0) ** 0.5
        return factor

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
        if self.target_net is not None:
            ema_update_(self.target_net, self.net, self.mu)
        # Lightning counts this step only after the hook: this is update global_step + 1.
        powers = [power_beta(g, self.global_step + 1) for g in self.ema_gammas]
        rates = [self.ema_rate(r) for r in self.ema_rates] + powers
        for rate, ema in zip(rates, self.ema):
            ema_update_(ema, self.net, rate)

    # --- sampling ---------------------------------------------------------------------------
    def sampler(self, ema: int | None = None) -> Sampler:
        net = self.ema[self.sample_ema if ema is None else ema]
        # A latent run's samples decode through its data's VAE (latent/data.py), in grids and metrics alike.
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return Sampler(net.eval(), self.parameterisation, decoder=getattr(data, "autoencoder", None))

    # --- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(self.frozen_prefixes)
        }
        method = self.objective.method_facts(self.trainer.max_steps)
        checkpoint[META_KEY] = metadata(
            self.run_config, self.parameterisation, self.ema_rates, self.ema_stds, self.sample_ema, method
        )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        own = self.state_dict()
        checkpoint["state_dict"].update({k: v for k, v in own.items() if k.startswith(self.frozen_prefixes)})
