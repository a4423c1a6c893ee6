"""Preconditioning around a backbone F: the EDM denoiser and the consistency function.

Both are  out(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
with (CM paper, Appendix C; EDM, Table 1 when eps = 0):

    c_skip  = sigma_data^2 / ((sigma - eps)^2 + sigma_data^2)
    c_out   = (sigma - eps) sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in    = 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise = 1000 * 0.25 * ln(sigma + 1e-44)   (ADM-style embedding, the authors' PyTorch code)
            | 0.25 * ln(sigma)                 (EDM)

With eps = sigma_min the consistency function satisfies f(x, sigma_min) = x exactly, because
c_skip = 1 and c_out = 0 there; with eps = 0 it is the EDM denoiser D(x, sigma).
"""

from dataclasses import dataclass

import torch
from torch import nn


def c_noise(sigma: torch.Tensor, kind: str = "adm") -> torch.Tensor:
    """Noise conditioning fed to the backbone (the network never sees raw sigma)."""
    if kind == "adm":
        return 1000 * 0.25 * torch.log(sigma + 1e-44)
    if kind == "edm":
        return 0.25 * torch.log(sigma)
    raise ValueError(f"c_noise kind={kind!r} is unknown; use 'adm' or 'edm'")


def scalings(sigma: torch.Tensor, sigma_data: float, eps: float):
    """(c_skip, c_out, c_in) of the boundary-respecting parameterisation; eps = 0 gives EDM's."""
    c_skip = sigma_data**2 / ((sigma - eps) ** 2 + sigma_data**2)
    c_out = (sigma - eps) * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    c_in = 1 / torch.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


@dataclass(frozen=True)
class Precond:
    """Applies the preconditioning to any backbone ``net(x, noise_labels, class_labels)``.

    Kept apart from the network so that the student, target, EMA copies and the teacher are
    plain backbones and one set of formulas serves them all.
    """

    sigma_data: float = 0.5
    eps: float = 0.002
    noise_kind: str = "adm"

    def __call__(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
        sigma = sigma.to(torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        c_skip, c_out, c_in = scalings(sigma, self.sigma_data, self.eps)
        x = x.to(torch.float32)
        F = net(c_in * x, c_noise(sigma.flatten(), self.noise_kind), labels)
        return c_skip * x + c_out * F.to(torch.float32)


def edm_denoiser(sigma_data: float = 0.5, noise_kind: str = "adm") -> Precond:
    """D_phi(x, sigma) of EDM: the consistency parameterisation with eps = 0."""
    return Precond(sigma_data=sigma_data, eps=0.0, noise_kind=noise_kind)


def consistency_function(sigma_data: float = 0.5, sigma_min: float = 0.002, noise_kind: str = "adm") -> Precond:
    """f_theta(x, sigma) of the CM paper, with f(x, sigma_min) = x by construction."""
    return Precond(sigma_data=sigma_data, eps=sigma_min, noise_kind=noise_kind)
