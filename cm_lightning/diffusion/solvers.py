"""Steps of the probability-flow ODE  dx/dsigma = (x - D(x, sigma)) / sigma  (EDM, eq. 3 with sigma(t) = t).

``denoiser(x, sigma)`` is any callable returning D(x, sigma) for a per-sample sigma of shape (B,).
"""

import torch

from cm_lightning.diffusion.shapes import per_sample
from cm_lightning.errors import ConfigError


def euler_step(denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """x' = x + (sigma' - sigma) d(x, sigma),  d = (x - D(x, sigma)) / sigma."""
    s, s_next = per_sample(sigma, x), per_sample(sigma_next, x)
    d = (x - denoiser(x, sigma)) / s
    return x + (s_next - s) * d


def heun_step(denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """EDM Algorithm 1's second-order step: an Euler step, then the average of the slopes at both ends.

    Where sigma' = 0 the second slope is undefined and the Euler step is returned, as in EDM.
    """
    s, s_next = per_sample(sigma, x), per_sample(sigma_next, x)
    d = (x - denoiser(x, sigma)) / s
    x_euler = x + (s_next - s) * d
    if bool((sigma_next == 0).all()):
        return x_euler
    d_next = (x_euler - denoiser(x_euler, sigma_next)) / s_next.clamp_min(torch.finfo(x.dtype).tiny)
    x_heun = x + (s_next - s) * (d + d_next) / 2
    return torch.where(s_next > 0, x_heun, x_euler)


SOLVERS = {"euler": euler_step, "heun": heun_step}


def get_solver(name: str):
    if name not in SOLVERS:
        raise ConfigError(f"solver={name!r} is unknown; choose one of {sorted(SOLVERS)}")
    return SOLVERS[name]
