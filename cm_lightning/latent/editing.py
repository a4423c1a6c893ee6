"""Zero-shot editing of a model trained on a VAE's latents: CM Algorithm 4 and SDEdit where they have a latent
meaning (the math of both is in diffusion/editing.py; here only what the VAE adds).

Inpainting (Algorithm 4 with A = I). The latent grid is coarser than the pixels by the VAE's factor k, and a
latent cell stands for the k x k pixel block it covers. The pixel mask Omega (1 = to generate) is taken to the
grid by the rule

    Omega_latent[i, j] = max over the block (i k .. i k + k - 1, j k .. j k + k - 1) of Omega,

i.e. a max-pool with kernel and stride k: a latent cell is kept only if every pixel it covers is known.
Why this rule and not the mean or the min: a kept cell is copied into the output unchanged, so a cell that
covered even one pixel of the hole would copy the reference's content into the region the user asked to
generate (and pin it there); generating a cell whose pixels were all known only costs the detail of those
pixels, which the consistency function redraws next to the known ones. The hole grows to whole cells.

The reference is Algorithm 4's first line in pixels, y <- y (1 - Omega), encoded by the VAE: the posterior
mean of the kept pixels (the hole zeroed), so that nothing of the hole reaches the kept latents through the
encoder's receptive field, as nothing of it reaches the kept pixels in pixel space. Algorithm 4 then runs on
the latent grid with Omega_latent broadcast over the latent channels, and its output keeps the reference's
latents exactly in every kept cell; decoding gives the pixels. Clamping to [-1, 1] (the authors' clamp of
pixel estimates) is skipped: latents have no such range.

Stroke-guided generation (SDEdit, CM Section 6) is the same operation on latents: the painting is encoded,
noised to sigma on the latent grid and mapped back by f (as latent diffusion's image-to-image does); sigma
is then a level of the latents' noise, in the model's own units.
"""

import torch
import torch.nn.functional as F

from cm_lightning.diffusion import editing
from cm_lightning.diffusion.linear_transforms import Identity


def latent_mask(omega: torch.Tensor, factor: int) -> torch.Tensor:
    """The pixel mask ``omega`` (N, 1, S, S), 1 = to generate, on the latent grid (N, 1, S/k, S/k): a cell is
    to be generated as soon as one pixel of its k x k block is (max-pool, the rule of the module's docstring)."""
    return F.max_pool2d(omega.float(), factor)


def covered(omega_latent: torch.Tensor, factor: int) -> torch.Tensor:
    """A latent mask back on the pixels: each cell's value over its k x k block (what the kept cells stand for)."""
    return omega_latent.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


@torch.no_grad()
def inpaint(f, autoencoder, y: torch.Tensor, omega: torch.Tensor, levels, parameterisation, generator=None):
    """Algorithm 4 (A = I) on the latents of ``y`` (N, C, S, S) in [-1, 1] with the pixel mask ``omega``;
    returns (reference latents, latent mask, edited latents), the last equal to the first where the mask is 0."""
    omega = omega.to(y)
    omega_latent = latent_mask(omega, autoencoder.factor)
    reference = autoencoder.latents(y * (1 - omega))
    edited = editing.edit(f, reference, Identity(), omega_latent, levels, parameterisation, generator, clip=False)
    return reference, omega_latent, edited


@torch.no_grad()
def stroke_guided(f, autoencoder, strokes: torch.Tensor, noise: torch.Tensor, levels, parameterisation, generator=None):
    """SDEdit on the latents of the stroke paintings ``strokes``: (their latents, the edited latents)."""
    z = autoencoder.latents(strokes)
    return z, editing.stroke_guided(f, z, noise, levels, parameterisation, generator, clip=False)
