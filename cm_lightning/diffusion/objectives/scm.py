"""Continuous-time consistency models, sCT and sCD (Lu & Song 2025, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", Sections 3-4, eq. 8 and Algorithm 1), on the TrigFlow parameterisation:

    t = arctan(exp(tau) / sigma_d), tau ~ N(P_mean, P_std^2);  x_t = cos(t) x0 + sin(t) z,  z ~ N(0, sigma_d^2 I)
    dx_t/dt = cos(t) z - sin(t) x0 (sCT)  |  sigma_d F_teacher(x_t / sigma_d, t) (sCD)
    g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF^-/dt),  r = min(1, step / H)
    g <- g / (||g|| + c)
    loss = exp(w(t)) / D * ||F_theta - F^- - g||^2 - w(t)

F^- is the student under stop-gradient (no target network) and dF^-/dt its total time derivative along the
trajectory, a forward-mode JVP along (dx_t/dt, 1) in (x_t, t) taken without a graph (``diffusion/jvp.py``).
The gradient comes from a separate ordinary forward of the student, which Lightning runs inside the DDP
wrapper, so it is synchronised like any other step. w is a small learned network of t (adaptive weighting).
"""

import torch
from torch import nn

from cm_lightning.diffusion.jvp import FD_STEP, check_mode, eager, jvp, probe
from cm_lightning.diffusion.objectives.base import Objective, StepContext
from cm_lightning.diffusion.precond import TrigFlow
from cm_lightning.diffusion.shapes import per_sample
from cm_lightning.errors import ConfigError
from cm_lightning.nets.adm import timestep_embedding


class LearnedWeighting(nn.Module):
    """w_phi(t): a linear layer on a positional embedding of t (sCM, Section 4.2 "adaptive weighting"). Its
    output starts at zero, so training starts with the unweighted loss."""

    def __init__(self, channels: int = 128):
        super().__init__()
        self.channels = channels
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear(timestep_embedding(t.float(), self.channels)).squeeze(-1)


def teacher_velocity(teacher, x_t: torch.Tensor, t: torch.Tensor, labels, sigma_data: float) -> torch.Tensor:
    """dx_t/dt of an EDM denoiser D(x, sigma) seen in TrigFlow: with sigma = sigma_d tan t and x_t / cos t =
    x0 + sigma eps, the PF-ODE velocity is sigma_d F_teacher = (cos(t) x_t - D(x_t / cos t, sigma)) / sin t."""
    cos, sin = torch.cos(t), torch.sin(t)
    denoised = teacher(x_t / per_sample(cos, x_t), sigma_data * torch.tan(t), labels).to(x_t.dtype)
    return (per_sample(cos, x_t) * x_t - denoised) / per_sample(sin, x_t)


def tangent(F_minus, dF_dt, x_t, dxt_dt, t, sigma_data: float, r: float, c: float) -> torch.Tensor:
    """sCM's normalised tangent g / (||g|| + c) with g = -cos^2 t (sigma_d F^- - dx_t/dt)
    - r cos t sin t (x_t + sigma_d dF^-/dt)."""
    cos, sin = per_sample(torch.cos(t), x_t), per_sample(torch.sin(t), x_t)
    g = -(cos**2) * (sigma_data * F_minus - dxt_dt) - r * cos * sin * (x_t + sigma_data * dF_dt)
    norm = g.flatten(1).norm(dim=1)
    return g / per_sample(norm + c, g)


class SCM(Objective):
    """sCT (``distill=false``) or sCD (``distill=true``: the tangent's dx_t/dt from an EDM teacher,
    ``model.teacher_ckpt``). ``warmup_steps`` is H of the tangent warm-up; ``tangent_c`` the normalisation's c;
    ``jvp``, ``jvp_step``: how dF^-/dt is taken (``diffusion/jvp.py``: autograd or finite_difference)."""

    frozen = ("teacher.",)

    def __init__(
        self,
        parameterisation: TrigFlow,
        p_mean: float = -1.0,
        p_std: float = 1.4,
        warmup_steps: int = 10000,
        tangent_c: float = 0.1,
        distill: bool = False,
        weighting_channels: int = 128,
        jvp: str = "autograd",
        jvp_step: float = FD_STEP,
    ):
        super().__init__(parameterisation)
        if not isinstance(parameterisation, TrigFlow):
            raise ConfigError(
                "model.objective.parameterisation must be TrigFlow for sCM (model/objective/parameterisation=trigflow)"
            )
        if not p_std > 0:
            raise ConfigError(
                f"model.objective.p_std={p_std}: the lognormal's standard deviation must be positive "
                "(published: 1.4 on CIFAR-10, 1.6 on ImageNet 64)"
            )
        if warmup_steps < 0 or not tangent_c > 0:
            raise ConfigError(
                f"model.objective: warmup_steps={warmup_steps} must be >= 0 and tangent_c={tangent_c} "
                "positive (published: 10000 and 0.1)"
            )
        self.p_mean, self.p_std, self.warmup_steps, self.tangent_c = p_mean, p_std, warmup_steps, tangent_c
        self.requires_teacher = distill
        self.weighting = LearnedWeighting(weighting_channels)
        check_mode(jvp, jvp_step)
        self.jvp_mode = dict(mode=jvp, step=jvp_step)

    def state(self, step: int) -> dict:
        return {"tangent_warmup": self.warmup(step)}

    def warmup(self, step: int) -> float:
        return 1.0 if self.warmup_steps == 0 else min(1.0, step / self.warmup_steps)

    def check(self, net) -> None:
        """One JVP through the network on a single image, so a layer without forward-mode AD stops before the
        first step rather than at it."""
        F = self.parameterisation.F
        probe(net, lambda f, x, labels, t: jvp(lambda x, t: F(f, x, t, labels), (x, t), (x, t), **self.jvp_mode))

    def loss(self, student, target_net, x0, labels, ctx: StepContext):
        g, shape, param = ctx.generator, x0.shape, self.parameterisation
        sigma_data = param.sigma_data
        tau, z = ctx.draw(
            shape[0],
            lambda b: (
                self.p_mean + self.p_std * torch.randn(b, generator=g, device=g.device),
                torch.randn((b, *shape[1:]), generator=g, device=g.device),
            ),
        )
        t = torch.atan(torch.exp(tau) / sigma_data)
        x_t = param.add_noise(x0, z, t)
        if self.requires_teacher:
            with torch.no_grad():
                dxt_dt = teacher_velocity(self.teacher, x_t, t, labels, sigma_data)
        else:
            dxt_dt = per_sample(torch.cos(t), x0) * sigma_data * z - per_sample(torch.sin(t), x0) * x0
        ctx.reseed_dropout()
        F_fn = lambda x, s: param.F(eager(student), x, s, labels)  # noqa: E731
        F_minus, dF_dt = jvp(F_fn, (x_t, t), (dxt_dt, torch.ones_like(t)), **self.jvp_mode)
        target_step = tangent(F_minus, dF_dt, x_t, dxt_dt, t, sigma_data, self.warmup(ctx.step), self.tangent_c)
        ctx.reseed_dropout()  # the same dropout masks as F^-, so that F_theta - F^- is zero in value
        F_theta = param.F(student, x_t, t, labels)
        w = self.weighting(t)
        distance = (F_theta - F_minus - target_step).pow(2).flatten(1).mean(dim=1)
        return torch.exp(w) * distance - w, {"weight": torch.exp(w).mean().detach()}
