"""EDM's preconditioning and the consistency models' boundary condition, in EDM's sigma: the Karras family of
parameterisations (``diffusion/parameterisation.py`` says what one is)."""

from dataclasses import dataclass

import torch
from torch import nn

from cm_lightning.diffusion.karras import karras_sigmas
from cm_lightning.diffusion.parameterisation import Parameterisation, c_noise, check_fields
from cm_lightning.diffusion.shapes import per_sample


def scalings(sigma: torch.Tensor, sigma_data: float, eps: float):
    """(c_skip, c_out, c_in) of the boundary-respecting parameterisation; eps = 0 gives EDM's."""
    c_skip = sigma_data**2 / ((sigma - eps) ** 2 + sigma_data**2)
    c_out = (sigma - eps) * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    c_in = 1 / torch.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


@dataclass(frozen=True)
class Precond(Parameterisation):
    """EDM's preconditioning and the CM consistency function (CM paper, Appendix C; EDM, Table 1 with eps = 0):

        out(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
        c_skip = sigma_data^2 / ((sigma - eps)^2 + sigma_data^2)
        c_out = (sigma - eps) sigma_data / sqrt(sigma^2 + sigma_data^2)
        c_in = 1 / sqrt(sigma^2 + sigma_data^2),  c_noise = 1000 * 0.25 ln(sigma + 1e-44) (adm) | 0.25 ln(sigma) (edm)

    With eps = sigma_min, f(x, sigma_min) = x exactly (c_skip = 1, c_out = 0): a consistency function. With
    eps = 0 it is the EDM denoiser D(x, sigma). x_sigma = x0 + sigma z; sigma_min, sigma_max and rho span the
    Karras grids of the samplers.
    """

    name = "karras"
    sigma_data: float = 0.5
    eps: float = 0.002
    noise_kind: str = "adm"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self):
        check_fields(self)

    def __call__(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
        sigma = sigma.to(torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        c_skip, c_out, c_in = scalings(sigma, self.sigma_data, self.eps)
        x = x.to(torch.float32)
        F = net(c_in * x, c_noise(sigma.flatten(), self.noise_kind), labels)
        return c_skip * x + c_out * F.to(torch.float32)

    @property
    def few_step(self) -> bool:
        return self.eps > 0

    @property
    def t_min(self) -> float:
        return self.sigma_min

    @property
    def t_max(self) -> float:
        return self.sigma_max

    def add_noise(self, x0, z, t):
        return x0 + per_sample(t, x0) * z

    def renoise(self, x, t, z):
        """CM Algorithm 1: x + sqrt(t^2 - eps^2) z."""
        t = per_sample(t, x)
        return x + (t**2 - self.sigma_min**2) ** 0.5 * z

    def level_plan(self, steps: int) -> list[float]:
        """The first ``steps`` levels of a descending Karras grid of steps + 1 points (1 step: [sigma_max])."""
        return karras_sigmas(steps + 1, **self.grid).flip(0)[:steps].tolist()

    def from_sigma(self, sigma: float) -> float:
        return float(sigma)

    def from_edm(self, x_sigma, t):
        return x_sigma


def edm_denoiser(sigma_data: float = 0.5, noise_kind: str = "adm", **grid) -> Precond:
    """D_phi(x, sigma) of EDM: the consistency parameterisation with eps = 0."""
    return Precond(sigma_data=sigma_data, eps=0.0, noise_kind=noise_kind, **grid)


def consistency_function(sigma_data: float = 0.5, sigma_min: float = 0.002, noise_kind: str = "adm", **grid) -> Precond:
    """f_theta(x, sigma) of the CM paper, with f(x, sigma_min) = x by construction."""
    return Precond(sigma_data=sigma_data, eps=sigma_min, noise_kind=noise_kind, sigma_min=sigma_min, **grid)
