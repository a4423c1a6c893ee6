"""One LightningModule for every consistency method (CD, CT and successors): the training step is
shared, and the pluggable target builder (``diffusion/targets.py``) is the only difference.
"""

import copy

import torch

from cm_lightning.checkpoints import load_matching, load_teacher
from cm_lightning.diffusion.precond import consistency_function, edm_denoiser
from cm_lightning.ema import ema_update_
from cm_lightning.errors import ConfigError
from cm_lightning.modules.base import GenerativeModule


class ConsistencyModule(GenerativeModule):
    kind = "consistency"

    def __init__(self, net, target, distance, optimizer, sigma_data: float = 0.5, noise_kind: str = "adm",
                 teacher_ckpt: str | None = None, init_from_teacher: bool = False, **kwargs):
        super().__init__(net, consistency_function(sigma_data, kwargs.get("sigma_min", 0.002), noise_kind),
                         optimizer, **kwargs)
        self.target = target
        self.distance = distance
        if target.requires_teacher or init_from_teacher:
            teacher = load_teacher(teacher_ckpt, like=self.net, precond=edm_denoiser(sigma_data, noise_kind))
            self._check_teacher(teacher, init_from_teacher)
            if target.requires_teacher:
                target.teacher = teacher
        # The target network theta^- starts equal to theta (after any initialisation from the teacher).
        self.target_net = None if target.uses_online_target else copy.deepcopy(self.net).requires_grad_(False)
        for ema in self.ema:
            ema.load_state_dict(self.net.state_dict())
        self.frozen_prefixes = ("target.teacher.", "distance.")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.target_net is not None:
            self.speed.prepare(self.target_net)
        if getattr(self.target, "teacher", None) is not None:
            self.speed.prepare(self.speed.frozen(self.target.teacher.net, self.trainer.precision))

    def _check_teacher(self, teacher, init_from_teacher: bool) -> None:
        for attr in ("image_size", "in_channels", "num_classes"):
            mine, theirs = getattr(self.net, attr, None), getattr(teacher.net, attr, None)
            if mine != theirs:
                raise ConfigError(
                    f"the teacher's net.{attr}={theirs} differs from this run's net.{attr}={mine}; "
                    "use a teacher trained on the same data and image size"
                )
        if init_from_teacher:
            load_matching(
                self.net, teacher.net.state_dict(), "the teacher checkpoint (model.teacher_ckpt)",
                "The student starts from the teacher's weights, so its net config must equal the teacher's; "
                "use the teacher run's net settings or set model.init_from_teacher=false",
            )

    def consistency_pair(self, x0, labels, batch_idx: int):
        """Student output f_theta(x0 + t z, t), the target sg f_target(x_r, r), and (t, r)."""
        g = self.step_generator(batch_idx)
        step, shape = self.global_step, x0.shape
        t, r, z = self.global_draw(shape[0], lambda b: (
            *self.target.sample_levels(step, b, g),
            torch.randn((b, *shape[1:]), generator=g, device=self.device),
        ))
        labels = self.labels_for(labels)
        self.seed_dropout(batch_idx)
        student = self.precond(self.net, x0 + t.view(-1, 1, 1, 1) * z, t, labels)
        # The teacher's and the target's evaluations keep no autograd state at all (inference mode); the
        # clone turns the result back into an ordinary tensor that the loss may save for its backward.
        with torch.inference_mode():
            x_r = self.target.target_input(x0, z, t, r, labels)
            self.seed_dropout(batch_idx)  # the same dropout masks as the student's forward
            target_net = self.net if self.target_net is None else self.target_net
            target = self.precond(target_net, x_r, r, labels)
            target = torch.where((r == 0).view(-1, 1, 1, 1), x0, target)
        return student, target.clone(), t, r

    def losses(self, x0, labels, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample weighted distances and their weights lambda(t, r)."""
        student, target, t, r = self.consistency_pair(x0, labels, batch_idx)
        weight = self.target.weight(t, r)
        return weight * self.distance(student, target), weight

    def training_step(self, batch, batch_idx):
        losses, weight = self.losses(*batch, batch_idx)
        loss = losses.mean()
        state = self.target.state(self.global_step)
        self.mu = state["mu"]  # applied to the target network once this step's update is done
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/weight", weight.mean())
        self.log_dict({f"train/{k}": float(v) for k, v in state.items()})
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.losses(*batch, batch_idx)[0].mean(), sync_dist=True)

    def after_optimizer_step(self) -> None:
        if self.target_net is not None:
            ema_update_(self.target_net, self.net, self.mu)
        super().after_optimizer_step()
