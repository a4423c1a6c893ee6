"""Distances d(x, y) of the consistency losses, each returning one value per image, shape (B,)."""

import math

import torch
from torch import nn

from cm_lightning.diffusion.lpips import LPIPS
from cm_lightning.errors import ConfigError


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


class L2(nn.Module):
    """Mean squared error over the pixels of each image (the authors' ``l2`` loss)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _flat(x - y).pow(2).mean(dim=1)


class L1(nn.Module):
    """Mean absolute error over the pixels of each image."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _flat(x - y).abs().mean(dim=1)


class PseudoHuber(nn.Module):
    """iCT's pseudo-Huber metric over the whole image (Song & Dhariwal 2024, eq. 6):

    d(x, y) = sqrt(||x - y||_2^2 + c^2) - c,   c = c_scale * sqrt(C * H * W).

    The norm is taken per image; applying it per pixel is a known bug of public re-implementations.
    """

    def __init__(self, c_scale: float = 0.00054):
        super().__init__()
        if not c_scale > 0:
            raise ConfigError(f"pseudo-Huber c_scale={c_scale}: must be positive (published: 0.00054)")
        self.c_scale = c_scale

    def c(self, x: torch.Tensor) -> float:
        return self.c_scale * math.sqrt(x[0].numel())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.c(x)
        return torch.sqrt(_flat(x - y).pow(2).sum(dim=1) + c**2) - c


__all__ = ["L1", "L2", "LPIPS", "PseudoHuber"]
