"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling", Section 4: the MeanFlow identity,
eq. 6, and the loss and target, eqs. 9-10), trained from scratch without a teacher, curriculum or target
network:

    z_t = (1 - t) x + t e,  e ~ N(0, I);  v = e - x
    u_tgt = v - (t - r) (v . d_z u + d_t u)                                        (eq. 10)
    delta = u_theta(z_t, r, t) - sg(u_tgt);  loss = ||delta||^2 / sg(||delta||^2 + c)^p   (eq. 9, adaptive weight)

The total derivative du/dt is a forward-mode JVP of u along (v, 0, 1) in (z, r, t), taken without a graph
(``diffusion/jvp.py``) in fp32 with autocast off, as the official PyTorch code does; the gradient comes from a
separate ordinary forward of the student under the same dropout masks, which Lightning runs inside the DDP
wrapper. (t, r): two logit-normal draws sorted so that t >= r, and r = t except for ``fraction`` of the samples
(the official code's sampler). With r = t the target is v: flow matching.

Classifier-free guidance folded into the target (Section 4.2; the official JAX code's guidance_fn), for
class-conditional nets with a "no class" label (``net.null_class``): v is replaced by

    v_g = omega v + kappa u(z_t, t, t | c) + (1 - omega - kappa) u(z_t, t, t | none)

(effective scale omega / (1 - kappa)), and ``label_dropout`` of the samples train the unconditional field
(label "none", target from v). ``guidance_t_max``: the guidance interval t <= t_max (FastGen's DiT-XL config,
0.75); above it the target is the plain v.
"""

import torch

from cm_lightning.diffusion.flow_map import CHAINS
from cm_lightning.diffusion.jvp import FD_STEP, check_mode, eager, jvp, probe
from cm_lightning.diffusion.meanflow_param import MeanFlowParam
from cm_lightning.diffusion.objectives.base import Objective, StepContext
from cm_lightning.diffusion.shapes import per_sample
from cm_lightning.errors import ConfigError
from cm_lightning.inputs import real


def mean_flow_target(u_fn, z, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor, tangent=None, **jvp_mode):
    """(u(z, r, t), u_tgt = v - (t - r) du/dt) with du/dt = w . d_z u + d_t u, the JVP along (w, 0, 1) in
    (z, r, t), both without a graph. The tangent w is v (MeanFlow eq. 10) unless ``tangent`` gives another
    (improved MeanFlow's u(z, t, t), ``imeanflow.py``). ``jvp_mode``: ``mode`` and ``step`` of ``jvp``."""
    w = v if tangent is None else tangent
    u, du_dt = jvp(u_fn, (z, r, t), (w, torch.zeros_like(r), torch.ones_like(t)), **jvp_mode)
    return u, v - per_sample(t - r, v) * du_dt


class MeanFlow(Objective):
    """MeanFlow on ``MeanFlowParam``. ``p_mean``, ``p_std``: the logit-normal of t and r; ``fraction``: the share
    of samples with r != t; ``norm_p``, ``norm_c``: the adaptive weight 1 / sg(||delta||^2 + c)^p;
    ``omega``, ``kappa``, ``label_dropout``: the folded guidance (omega = 1, kappa = 0, label_dropout = 0: off);
    ``jvp``, ``jvp_step``: how du/dt is taken (``diffusion/jvp.py``: autograd or finite_difference)."""

    def __init__(
        self,
        parameterisation: MeanFlowParam,
        p_mean: float = -0.4,
        p_std: float = 1.0,
        fraction: float = 0.25,
        norm_p: float = 1.0,
        norm_c: float = 1e-3,
        omega: float = 1.0,
        kappa: float = 0.0,
        label_dropout: float = 0.0,
        guidance_t_max: float = 1.0,
        jvp: str = "autograd",
        jvp_step: float = FD_STEP,
    ):
        super().__init__(parameterisation)
        if not isinstance(parameterisation, MeanFlowParam):
            raise ConfigError(
                "model.objective.parameterisation must be MeanFlow's linear interpolation "
                "(model/objective/parameterisation=meanflow)"
            )
        if parameterisation.chain not in CHAINS:
            raise ConfigError(
                f"model.objective.parameterisation.chain={parameterisation.chain!r} is unknown; use flow_map "
                "(MeanFlow's jumps z_r = z_t - (t - r) u) or renoise (CM Algorithm 1)"
            )
        for key, value, example in (
            ("p_mean", p_mean, "-0.4"),
            ("p_std", p_std, "1.0"),
            ("fraction", fraction, "0.25"),
            ("norm_p", norm_p, "1.0"),
            ("norm_c", norm_c, "1e-3"),
            ("omega", omega, "1.0"),
            ("kappa", kappa, "0.0"),
            ("label_dropout", label_dropout, "0.0"),
            ("guidance_t_max", guidance_t_max, "1.0"),
        ):
            real(value, f"model.objective.{key}", example=example)  # a string, list or NaN before any range check
        if not p_std > 0:
            raise ConfigError(
                f"model.objective.p_std={p_std}: the logit-normal's standard deviation must be "
                "positive (published: 1.0 on ImageNet, 2.0 on CIFAR-10)"
            )
        if not 0 <= fraction <= 1:
            raise ConfigError(
                f"model.objective.fraction={fraction}: the share of samples with r != t must be in "
                "[0, 1] (published: 0.25 on ImageNet, 0.75 on CIFAR-10)"
            )
        if norm_p < 0:
            raise ConfigError(
                f"model.objective.norm_p={norm_p}: the adaptive weight's power must be >= 0 "
                "(published: 1.0 on ImageNet, 0.75 on CIFAR-10; 0 is the plain squared loss)"
            )
        if not norm_c > 0:
            raise ConfigError(
                f"model.objective.norm_c={norm_c}: the adaptive weight's constant must be positive (published: 1e-3)"
            )
        if not 0 < guidance_t_max <= 1:
            raise ConfigError(
                f"model.objective.guidance_t_max={guidance_t_max}: guidance applies at t <= t_max, in (0, 1] "
                "(1: everywhere; FastGen's DiT-XL 0.75)"
            )
        if not 0 <= label_dropout < 1:
            raise ConfigError(f"model.objective.label_dropout={label_dropout} must be in [0, 1) (published: 0.1)")
        self.p_mean, self.p_std, self.fraction = p_mean, p_std, fraction
        self.norm_p, self.norm_c = norm_p, norm_c
        self.omega, self.kappa, self.label_dropout = omega, kappa, label_dropout
        self.guidance_t_max = guidance_t_max
        check_mode(jvp, jvp_step)
        self.jvp_mode = dict(mode=jvp, step=jvp_step)

    @property
    def guided(self) -> bool:
        return self.omega != 1 or self.kappa != 0 or self.label_dropout > 0

    def check(self, net) -> None:
        """The net takes (t, t - r), has a "no class" label when guidance is on, and runs one JVP on a single
        image, so that each of these stops before the first step rather than at it."""
        if getattr(net, "num_times", 1) != 2:
            raise ConfigError(
                f"net.num_times={getattr(net, 'num_times', 1)}: MeanFlow's network takes two times "
                "(t, t - r); set net.num_times=2"
            )
        if self.guided and not getattr(net, "null_class", False):
            raise ConfigError(
                "model.objective: guidance (omega != 1, kappa != 0 or label_dropout > 0) needs a "
                "class-conditional net with a 'no class' label; set net.num_classes and "
                "net.null_class=true, or omega=1, kappa=0, label_dropout=0"
            )
        probe(
            net,
            lambda f, x, labels, t: mean_flow_target(
                lambda z, r, t: self.parameterisation.u(f, z, r, t, labels), x, 0 * t, t, x, **self.jvp_mode
            ),
        )

    def draws(self, x0: torch.Tensor, ctx: StepContext):
        """(t, r, e, dropped) for the batch: t >= r from two logit-normals, r = t outside ``fraction``, and which
        samples lose their label. Drawn for the global batch, so they do not depend on the number of ranks."""
        g, shape = ctx.generator, x0.shape

        def draw(b):
            a, c = (
                torch.sigmoid(self.p_mean + self.p_std * torch.randn(b, generator=g, device=g.device)) for _ in range(2)
            )
            keep_r = torch.rand(b, generator=g, device=g.device) < self.fraction
            dropped = torch.rand(b, generator=g, device=g.device) < self.label_dropout
            e = torch.randn((b, *shape[1:]), generator=g, device=g.device)
            t = torch.maximum(a, c)
            return t, torch.where(keep_r, torch.minimum(a, c), t), e, dropped

        return ctx.draw(shape[0], draw)

    def guided_velocity(self, student, z, t, v, labels, dropped):
        """The folded guidance's v_g from the student's instantaneous velocities u(z_t, t, t) (no dropout, no
        graph), and the labels the loss conditions on: "none" (index num_classes) where dropped, with v as the
        target, as above the guidance interval (there with the labels kept)."""
        none = torch.full_like(labels, student.num_classes)
        was_training = student.training
        student.eval()
        u = lambda labels: self.parameterisation.u(eager(student), z, t, t, labels)  # noqa: E731
        with torch.no_grad():
            v_g = self.omega * v + (1 - self.omega - self.kappa) * u(none)
            if self.kappa:
                v_g = v_g + self.kappa * u(labels)
        student.train(was_training)
        mask = per_sample(dropped | (t > self.guidance_t_max), v).bool()
        return torch.where(mask, v, v_g), torch.where(dropped, none, labels)

    def tangent(self, u_fn, z: torch.Tensor, t: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The z-direction of du/dt: MeanFlow's is the (guided) conditional velocity v itself (eq. 10)."""
        return v

    def loss(self, student, target_net, x0, labels, ctx: StepContext):
        parameterisation = self.parameterisation
        t, r, e, dropped = self.draws(x0, ctx)
        x0 = x0.float()
        z, v = parameterisation.add_noise(x0, e, t), e - x0
        with torch.autocast(x0.device.type, enabled=False):  # the JVP in fp32 (the official code)
            if self.guided:
                v, labels = self.guided_velocity(student, z, t, v, labels, dropped)
            u_fn = lambda z, r, t: parameterisation.u(eager(student), z, r, t, labels)  # noqa: E731
            tangent = self.tangent(u_fn, z, t, v, ctx)
            ctx.reseed_dropout()
            _, u_tgt = mean_flow_target(u_fn, z, r, t, v, tangent, **self.jvp_mode)
        ctx.reseed_dropout()  # the JVP's dropout masks, so that u_theta is the function the target was taken of
        u_theta = parameterisation.u(student, z, r, t, labels)
        squared = (u_theta - u_tgt).pow(2).flatten(1).sum(dim=1)
        weight = (squared.detach() + self.norm_c).pow(-self.norm_p)
        return weight * squared, {"squared_error": squared.mean().detach(), "r_ne_t": (r != t).float().mean()}
