"""MeanFlow's parameterisation in t (``diffusion/parameterisation.py`` says what one is)."""

from dataclasses import dataclass

import torch
from torch import nn

from cm_lightning.diffusion.parameterisation import Parameterisation, check_fields, working
from cm_lightning.diffusion.shapes import per_sample


@dataclass(frozen=True)
class MeanFlowParam(Parameterisation):
    """MeanFlow (Geng et al. 2025, Sections 3-4): z_t = (1 - t) x + t e, e ~ N(0, I), t in [0, 1], and a network
    u(z_t, r, t) of the average velocity over [r, t], fed the two times (t, t - r) scaled by ``time_scale``
    (the official code feeds them as they are). The clean-image estimate is the jump to r = 0 of the paper's
    one-step sampler, z_r = z_t - (t - r) u(z_t, r, t) at r = 0:

        f(z_t, t) = z_t - t u(z_t, 0, t)

    so f(z, 0) = z, and one step from t = 1 is x = z_1 - u(z_1, 0, 1). EDM's x0 + sigma e is z_t / (1 - t) at
    t = sigma / (1 + sigma). ``chain``: how more steps go, ``flow_map`` (MeanFlow's jumps z_r = z_t - (t - r)
    u(z_t, r, t), ``jump``; the default) or ``renoise`` (f's estimate re-noised to the next level, CM Algorithm 1).
    """

    name = "meanflow"
    time_scale: float = 1.0
    sigma_min: float = 0.002  # the Karras grids behind ts= indices and the published editing sigmas
    sigma_max: float = 80.0
    rho: float = 7.0
    chain: str = "flow_map"
    few_step = True

    def __post_init__(self):
        check_fields(self)

    def u(self, net: nn.Module, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        """The average velocity u(z_t, r, t) in fp32 (float64 kept): the net sees (t, t - r) as in the paper."""
        z = working(z)
        t, r = t.to(z.dtype).flatten(), r.to(z.dtype).flatten()
        return net(z, self.time_scale * torch.stack([t, t - r], dim=1), labels).to(z.dtype)

    def jump(self, net: nn.Module, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        """MeanFlow's flow map z_r = z_t - (t - r) u(z_t, r, t) (eq. 4)."""
        r, t = r.flatten(), t.flatten()
        u = self.u(net, z, r, t, labels)
        return working(z) - per_sample(t.to(u.dtype) - r.to(u.dtype), u) * u

    def __call__(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        t = t.flatten()
        return self.jump(net, x, torch.zeros_like(t), t, labels)

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        return 1.0

    def add_noise(self, x0, z, t):
        t = per_sample(t, x0)
        return (1 - t) * x0 + t * z

    def level_plan(self, steps: int) -> list[float]:
        """Evenly spaced times 1, (k - 1) / k, ..., 1 / k: k equal intervals of [0, 1]."""
        return [(steps - i) / steps for i in range(steps)]

    def from_sigma(self, sigma: float) -> float:
        return float(sigma) / (1 + float(sigma))

    def from_edm(self, x_sigma, t):
        return (1 - per_sample(t, x_sigma)) * x_sigma
