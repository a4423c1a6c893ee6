"""Continuous-time consistency models, sCT and sCD (Lu & Song 2025, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", Sections 3-4, eq. 8 and Algorithm 1), on the TrigFlow parameterisation:

    t = arctan(exp(tau) / sigma_d), tau ~ N(P_mean, P_std^2);  x_t = cos(t) x0 + sin(t) z,  z ~ N(0, sigma_d^2 I)
    dx_t/dt = cos(t) z - sin(t) x0 (sCT)  |  sigma_d F_teacher(x_t / sigma_d, t) (sCD)
    g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF^-/dt),  r = min(1, step / H)
    g <- g / (||g|| + c)  (tangent_norm=norm)  |  g / (||g|| / sqrt(D) + c)  (tangent_norm=rms)
    loss = exp(w(t)) / D * lambda(t) * ||F_theta - F^- - g||^2 - w(t),  lambda(t) = 1 / (sigma_d tan t) or 1

F^- is the student's own forward under stop-gradient (no target network), so F_theta - F^- is zero in value
whatever kernel the JVP's forward runs on; dF^-/dt is its total time derivative along the trajectory, a
forward-mode JVP along (dx_t/dt, 1) in (x_t, t) taken without a graph (``diffusion/jvp.py``), in fp32 with
autocast off unless ``jvp_precision=autocast``. The gradient comes from the ordinary forward of the student,
which Lightning runs inside the DDP wrapper, so it is synchronised like any other step. w is a small learned
network of t (adaptive weighting).
"""

import contextlib
import math
from numbers import Real

import torch
from torch import nn

from cm_lightning.diffusion.jvp import FD_STEP, check_mode, eager, jvp, probe
from cm_lightning.diffusion.objectives.base import Objective, StepContext
from cm_lightning.diffusion.shapes import per_sample
from cm_lightning.diffusion.trigflow import TrigFlow, draw_times
from cm_lightning.errors import ConfigError
from cm_lightning.nets.adm import timestep_embedding


class LearnedWeighting(nn.Module):
    """w_phi(t) on a positional embedding of t (sCM, Section 4.2 "adaptive weighting"): ``linear``, one linear
    layer, or ``mlp``, the paper's MLP (linear, SiLU, linear). The last layer starts at zero, so training starts
    with the unweighted loss."""

    def __init__(self, channels: int = 128, form: str = "linear"):
        super().__init__()
        self.channels = channels
        last = nn.Linear(channels, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.linear = last if form == "linear" else nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), last)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear(timestep_embedding(t.float(), self.channels)).squeeze(-1)


def teacher_velocity(teacher, x_t: torch.Tensor, t: torch.Tensor, labels, sigma_data: float) -> torch.Tensor:
    """dx_t/dt of an EDM denoiser D(x, sigma) seen in TrigFlow: with sigma = sigma_d tan t and x_t / cos t =
    x0 + sigma eps, the PF-ODE velocity is sigma_d F_teacher = (cos(t) x_t - D(x_t / cos t, sigma)) / sin t."""
    cos, sin = torch.cos(t), torch.sin(t)
    denoised = teacher(x_t / per_sample(cos, x_t), sigma_data * torch.tan(t), labels).to(x_t.dtype)
    return (per_sample(cos, x_t) * x_t - denoised) / per_sample(sin, x_t)


def tangent(F_minus, dF_dt, x_t, dxt_dt, t, sigma_data: float, r: float, c: float, norm: str = "norm") -> torch.Tensor:
    """sCM's normalised tangent g / (||g|| + c) (``norm``; sCM, Section 4.2) or g / (||g|| / sqrt(D) + c)
    (``rms``, FastGen's: c then means the same at every resolution), with g = -cos^2 t (sigma_d F^- - dx_t/dt)
    - r cos t sin t (x_t + sigma_d dF^-/dt)."""
    cos, sin = per_sample(torch.cos(t), x_t), per_sample(torch.sin(t), x_t)
    g = -(cos**2) * (sigma_data * F_minus - dxt_dt) - r * cos * sin * (x_t + sigma_data * dF_dt)
    size = g.flatten(1).norm(dim=1)
    if norm == "rms":
        size = size / math.sqrt(g[0].numel())
    return g / per_sample(size + c, g)


class SCM(Objective):
    """sCT (``distill=false``) or sCD (``distill=true``: the tangent's dx_t/dt from an EDM teacher,
    ``model.teacher_ckpt``). ``warmup_steps`` is H of the tangent warm-up; ``tangent_c`` the normalisation's c;
    ``jvp``, ``jvp_step``: how dF^-/dt is taken (``diffusion/jvp.py``: autograd or finite_difference);
    ``jvp_precision``: fp32 (autocast off for the JVP and the tangent) or autocast (the run's mixed precision).
    ``tangent_norm``: norm or rms (``tangent``); ``prior_weighting``: lambda(t) = 1 / (sigma_d tan t), FastGen's
    default, or 1; ``weighting``: the learned weighting's form, linear or mlp."""

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
        jvp_precision: str = "fp32",
        tangent_norm: str = "norm",
        prior_weighting: bool = False,
        weighting: str = "linear",
    ):
        super().__init__(parameterisation)
        if not isinstance(parameterisation, TrigFlow):
            raise ConfigError(
                "model.objective.parameterisation must be TrigFlow for sCM (model/objective/parameterisation=trigflow)"
            )
        for name, value in (("p_mean", p_mean), ("p_std", p_std)):
            # exp(tau) overflows fp32 past |tau| ~ 88; a mean beyond 10 puts every t at 0 or pi/2.
            if isinstance(value, bool) or not isinstance(value, Real) or not abs(value) <= 10:
                raise ConfigError(
                    f"model.objective.{name}={value!r}: a number of magnitude at most 10 "
                    "(published p_mean, p_std: -1.0, 1.4 on CIFAR-10; -0.8, 1.6 on ImageNet 64)"
                )
        if not p_std > 0:
            raise ConfigError(
                f"model.objective.p_std={p_std}: the lognormal's standard deviation must be positive "
                "(published: 1.4 on CIFAR-10, 1.6 on ImageNet 64)"
            )
        if isinstance(weighting_channels, bool) or not isinstance(weighting_channels, int) or weighting_channels < 2:
            raise ConfigError(
                f"model.objective.weighting_channels={weighting_channels!r}: an integer >= 2 (published: 128)"
            )
        choices = (
            ("jvp_precision", jvp_precision, ("fp32", "autocast")),
            ("tangent_norm", tangent_norm, ("norm", "rms")),
        )
        for name, value, allowed in choices + (("weighting", weighting, ("linear", "mlp")),):
            if value not in allowed:
                raise ConfigError(f"model.objective.{name}={value!r} is unknown; use one of {', '.join(allowed)}")
        if warmup_steps < 0 or not 0 < tangent_c < math.inf:
            raise ConfigError(
                f"model.objective: warmup_steps={warmup_steps} must be >= 0 and tangent_c={tangent_c} "
                "positive and finite (published: 10000 and 0.1)"
            )
        self.p_mean, self.p_std, self.warmup_steps, self.tangent_c = p_mean, p_std, warmup_steps, tangent_c
        self.requires_teacher = distill
        self.weighting = LearnedWeighting(weighting_channels, weighting)
        check_mode(jvp, jvp_step)
        self.jvp_mode = dict(mode=jvp, step=jvp_step)
        self.jvp_precision, self.tangent_norm, self.prior_weighting = jvp_precision, tangent_norm, prior_weighting

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
        parameterisation = self.parameterisation
        sigma_data = parameterisation.sigma_data
        t, z, x_t = draw_times(parameterisation, self.p_mean, self.p_std, x0, ctx)
        if self.requires_teacher:
            with torch.no_grad():
                dxt_dt = teacher_velocity(self.teacher, x_t, t, labels, sigma_data)
        else:
            dxt_dt = per_sample(torch.cos(t), x0) * sigma_data * z - per_sample(torch.sin(t), x0) * x0
        ctx.reseed_dropout()
        dF_dt = self.time_derivative(student, x_t, t, dxt_dt, labels)
        ctx.reseed_dropout()  # the JVP's dropout masks, so that dF^-/dt is the derivative of this very F
        F_theta = parameterisation.F(student, x_t, t, labels)
        F_minus = F_theta.detach()
        with self.precision(x_t):
            target_step = tangent(
                F_minus.float(),
                dF_dt,
                x_t,
                dxt_dt,
                t,
                sigma_data,
                self.warmup(ctx.step),
                self.tangent_c,
                self.tangent_norm,
            )
        w = self.weighting(t)
        prior = 1 / (sigma_data * torch.tan(t)) if self.prior_weighting else torch.ones_like(t)
        distance = (F_theta - F_minus - target_step).pow(2).flatten(1).mean(dim=1)
        return torch.exp(w) * prior * distance - w, {"weight": torch.exp(w).mean().detach()}

    def precision(self, x: torch.Tensor):
        """Autocast off for ``jvp_precision=fp32``: a bf16 tangent carries a 1e-2 relative error into the target."""
        return (
            contextlib.nullcontext()
            if self.jvp_precision == "autocast"
            else torch.autocast(x.device.type, enabled=False)
        )

    def time_derivative(self, student, x_t, t, dxt_dt, labels) -> torch.Tensor:
        """dF^-/dt, the JVP of F along (dx_t/dt, 1), in fp32 unless ``jvp_precision=autocast``."""
        F_fn = lambda x, s: self.parameterisation.F(eager(student), x, s, labels)  # noqa: E731
        with self.precision(x_t):
            _, dF_dt = jvp(F_fn, (x_t.float(), t.float()), (dxt_dt.float(), torch.ones_like(t)), **self.jvp_mode)
        return dF_dt
