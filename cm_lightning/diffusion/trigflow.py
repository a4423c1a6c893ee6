"""TrigFlow, sCM's parameterisation in t (``diffusion/parameterisation.py`` says what one is)."""

import math
from dataclasses import dataclass

import torch
from torch import nn

from cm_lightning.diffusion.karras import karras_sigmas
from cm_lightning.diffusion.parameterisation import Parameterisation, c_noise, check_fields, working
from cm_lightning.diffusion.shapes import per_sample
from cm_lightning.errors import ConfigError


def draw_times(parameterisation, p_mean: float, p_std: float, x0: torch.Tensor, ctx):
    """sCM's proposal (Section 4.2): t = arctan(exp(tau) / sigma_d), tau ~ N(P_mean, P_std^2), the noise z, and
    x_t = cos(t) x0 + sin(t) sigma_d z, for one batch through the step context's global draw."""
    g, shape = ctx.generator, x0.shape
    tau, z = ctx.draw(
        shape[0],
        lambda b: (
            p_mean + p_std * torch.randn(b, generator=g, device=g.device),
            torch.randn((b, *shape[1:]), generator=g, device=g.device),
        ),
    )
    t = torch.atan(torch.exp(tau) / parameterisation.sigma_data)
    return t, z, parameterisation.add_noise(x0, z, t)


@dataclass(frozen=True)
class TrigFlow(Parameterisation):
    """TrigFlow (sCM, Lu & Song 2025, Section 3 and eq. 8): x_t = cos(t) x0 + sin(t) z with z ~ N(0, sigma_d^2 I),
    t in [0, pi/2], and

        f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, c_noise(t))

    so f(x, 0) = x exactly. The same formula is TrigFlow's denoiser, and sigma_d F is the PF-ODE velocity
    dx_t/dt. EDM's sigma corresponds to t = arctan(sigma / sigma_d), and x_t = cos(t) (x0 + sigma eps).
    Sampling starts at t_max = arctan(sigma_max / sigma_d); two steps go through ``t_mid`` (1.1, Section 5).
    ``diffusion``: the model is a TrigFlow diffusion model (sCM's pretraining), seen by samplers and distillation
    as an EDM denoiser: D(x_sigma, sigma) = f(cos(t) x_sigma, t) at t = arctan(sigma / sigma_d), since
    x_t = cos(t) x_sigma; it is then sampled with the ODE solver, not one-step.

    ``noise_kind``: ``t`` feeds c_noise(t) = time_scale * t (sCM's identity time transformation). ``adm`` or
    ``edm`` feed EDM's c_noise(sigma_d tan t) of that kind and negate the output: then F is exactly an EDM
    network's backbone (EDM's c_in x_sigma equals x_t / sigma_d, c_skip = cos^2 t and c_out = sigma_d sin t), so
    a student initialised from an EDM teacher starts as that teacher (sCD).
    """

    name = "trigflow"
    sigma_data: float = 0.5
    sigma_max: float = 80.0
    t_mid: float = 1.1
    noise_kind: str = "t"
    time_scale: float = 1.0
    sigma_min: float = 0.002  # the Karras grids of ts= indices and of k > 2 steps start here
    rho: float = 7.0
    diffusion: bool = False

    @property
    def few_step(self) -> bool:
        return not self.diffusion

    def __post_init__(self):
        check_fields(self)
        if self.noise_kind not in ("t", "adm", "edm"):
            raise ConfigError(
                f"noise_kind={self.noise_kind!r} is unknown for TrigFlow; use t (sCM), adm or edm "
                "(an EDM network's conditioning)"
            )
        if not 0 < self.t_mid < self.t_max:
            raise ConfigError(
                f"t_mid={self.t_mid} is outside (0, t_max={self.t_max:.4f}); the published two-step midpoint is 1.1"
            )

    def F(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        """The backbone's output F(x_t / sigma_d, c_noise(t)) in fp32; sigma_d F is the velocity dx_t/dt."""
        x = working(x)
        t = t.to(x.dtype).flatten()
        if self.noise_kind == "t":
            return net(x / self.sigma_data, self.time_scale * t, labels).to(x.dtype)
        return -net(x / self.sigma_data, c_noise(self.sigma_data * torch.tan(t), self.noise_kind), labels).to(x.dtype)

    def __call__(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        """f(x_t, t); with ``diffusion``, EDM's D(x_sigma, sigma) (the class docstring)."""
        if self.diffusion:
            sigma = torch.as_tensor(t, device=x.device).to(working(x).dtype).flatten().expand(x.shape[0])
            t = torch.atan(sigma / self.sigma_data)
            x = per_sample(torch.cos(t), x) * working(x)
        F = self.F(net, x, t, labels)
        x = working(x)
        t = per_sample(t.flatten(), x)
        return torch.cos(t) * x - torch.sin(t) * self.sigma_data * F

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        return math.atan(self.sigma_max / self.sigma_data)

    def add_noise(self, x0, z, t):
        t = torch.as_tensor(per_sample(t, x0), device=x0.device)
        return torch.cos(t) * x0 + torch.sin(t) * self.sigma_data * z

    def level_plan(self, steps: int) -> list[float]:
        """1 step: [t_max]; 2 steps: [t_max, t_mid] (sCM); more: the Karras grid's levels as times."""
        if steps == 2:
            return [self.t_max, self.t_mid]
        return [self.from_sigma(s) for s in karras_sigmas(steps + 1, **self.grid).flip(0)[:steps].tolist()]

    def from_sigma(self, sigma: float) -> float:
        return math.atan(float(sigma) / self.sigma_data)

    def from_edm(self, x_sigma, t):
        return torch.cos(torch.as_tensor(per_sample(t, x_sigma), device=x_sigma.device)) * x_sigma
