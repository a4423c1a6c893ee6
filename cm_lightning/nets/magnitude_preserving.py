"""EDM2's magnitude-preserving layers (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", Appendix B): each keeps unit-variance inputs at unit-variance outputs, so activations and weights
keep their magnitudes through training. The EDM2 U-Net (``edm2.py``) is built from them.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cm_lightning.errors import ConfigError


def _working(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + ||x|| / sqrt(N)) over ``dim`` (all but the first by default): unit RMS (eq. 46's normalisation)."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=_working(x))
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled to unit output magnitude for unit-variance Gaussian input (eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """((1 - t) a + t b) / sqrt((1 - t)^2 + t^2) (eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation weighted (1 - t) : t with the total magnitude preserved (eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


class MPFourier(nn.Module):
    """sqrt(2) cos(2 pi (f c_noise + phi)), f ~ N(0, 1), phi ~ U(0, 1) fixed (eq. 75): unit RMS over channels."""

    def __init__(self, channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _working(x)
        y = x.to(dtype).outer(self.freqs.to(dtype)) + self.phases.to(dtype)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPPositional(nn.Module):
    """sqrt(2) [cos(t w_i), sin(t w_i)], w_i = 10000^(-i / (C/2 - 1)): the positional time embedding sCM uses in
    place of the Fourier one (Lu & Song 2025, Section 4.1), scaled by sqrt(2) to the Fourier features' unit RMS
    so that the MP layers after it see the magnitude they were designed for."""

    def __init__(self, channels: int, max_period: float = 10000.0):
        super().__init__()
        if channels % 2 or channels < 4:
            raise ConfigError(f"the positional time embedding needs an even width >= 4, got {channels}")
        self.channels, self.max_period = channels, max_period

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, half = _working(x), self.channels // 2
        freqs = self.max_period ** -(torch.arange(half, dtype=dtype, device=x.device) / (half - 1))
        y = x.to(dtype).outer(freqs)
        return (torch.cat([y.cos(), y.sin()], dim=1) * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (``kernel=()``: fully connected) with forced weight normalisation.

    In training, a forward that builds a graph first rescales the stored weight to unit norm per output channel
    (eq. 66), so the weights never grow and the effective learning rate stays fixed; only the weights being
    trained: a frozen teacher, a target network or an EMA keeps the weights it was given, and a forward without
    a graph (a JVP, a stop-gradient target) never changes weights that a pending backward still needs. The
    weight used is then normalised again and scaled by gain / sqrt(fan_in) (eq. 47)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        w = self.weight.to(_working(x))
        if self.training and torch.is_grad_enabled() and self.weight.requires_grad:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)
