"""Zero-shot editing with a consistency function f(x, sigma) (CM paper, Section 6 and Algorithm 4).

Every routine runs the same chain: evaluate f at a noise level, clamp to [-1, 1] as the authors'
samplers do, optionally project back onto the constraint, and re-noise to the next level with
sqrt(sigma_n^2 - eps^2) fresh noise (CM Algorithm 1). ``f`` takes a per-sample sigma of shape (B,);
bind class labels into it (``lambda x, s: sampler.denoise(x, s, labels)``).

Algorithm 4 (y the reference, A orthogonal, Omega = 1 where A x is to be generated):

    y <- A^T[(A y)(1 - Omega)];  x <- y + sigma_1 z
    for each sigma_n: x <- f(x, sigma_n); x <- A^T[(A y)(1 - Omega) + (A x) Omega]; re-noise
so (A x)(1 - Omega) = (A y)(1 - Omega) holds exactly for the output.
"""

import math

import torch

from cm_lightning.diffusion.sampling import check_decreasing, sigmas_from_indices
from cm_lightning.errors import ConfigError

# The authors' published multistep settings (launch.sh; ternary-searched midpoints): ts indices into a
# grid of num_scales points, keyed by (method, num_scales). A model trained on another grid gets its
# method's ImageNet-64 entry evaluated on its own sigma_min, sigma_max, rho.
PUBLISHED_TS = {
    ("cd", 40): (0, 22, 39),     # CD, ImageNet 64
    ("ct", 201): (0, 106, 200),  # CT, ImageNet 64
    ("ct", 151): (0, 67, 150),   # CT, LSUN Bedroom 256
}
FALLBACK_GRID = {"cd": 40, "ct": 201}


def published_edit_sigmas(method: str, num_scales: int, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> list[float]:
    """Default noise levels for editing: the published two-step setting for ``method`` ('cd' or 'ct')
    on a grid of ``num_scales`` points, or the method's ImageNet-64 setting when none was published."""
    if (method, num_scales) not in PUBLISHED_TS:
        num_scales = FALLBACK_GRID[method]
    return sigmas_from_indices(PUBLISHED_TS[method, num_scales], num_scales, sigma_min, sigma_max, rho)


def check_levels(sigmas, sigma_min: float, sigma_max: float, what: str = "edit_sigmas") -> list[float]:
    sigmas = check_decreasing(sigmas, what)
    if sigmas[0] > sigma_max or sigmas[-1] < sigma_min:
        raise ConfigError(
            f"{what}={sigmas} leaves the model's noise range [{sigma_min}, {sigma_max}]; keep every level inside it"
        )
    return sigmas


def consistency_chain(f, x, sigmas, sigma_min: float = 0.002, generator=None, project=None, clip: bool = True):
    """CM Algorithm 1 from a state ``x`` already at noise level sigmas[0], with an optional projection
    after every evaluation (the replacement step of Algorithm 4)."""
    ones = torch.ones(x.shape[0], device=x.device)
    for i, s in enumerate(sigmas):
        if i:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + math.sqrt(s**2 - sigma_min**2) * noise
        x = f(x, s * ones)
        if clip:
            x = x.clamp(-1, 1)
        if project is not None:
            x = project(x)
    return x


def check_mask(omega: torch.Tensor, y: torch.Tensor) -> None:
    try:
        torch.broadcast_shapes(omega.shape, y.shape)
    except RuntimeError:
        raise ConfigError(
            f"the mask has shape {tuple(omega.shape)} but the images have shape {tuple(y.shape)}; "
            "give one mask per image (or one for all) at the images' resolution"
        ) from None


def degrade(y: torch.Tensor, transform, omega: torch.Tensor) -> torch.Tensor:
    """A^T[(A y)(1 - Omega)]: what Algorithm 4 keeps of the reference."""
    return transform.inverse(transform(y) * (1 - omega))


@torch.no_grad()
def edit(f, y: torch.Tensor, transform, omega: torch.Tensor, sigmas, sigma_min: float = 0.002,
         generator=None, clip: bool = True) -> torch.Tensor:
    """CM Algorithm 4 for an orthogonal ``transform`` (A and its transpose A.inverse) and mask ``omega``."""
    check_mask(omega, y)
    sigmas = check_decreasing(sigmas, "edit_sigmas")
    omega = omega.to(y)
    kept = transform(y) * (1 - omega)
    x = transform.inverse(kept)
    x = x + sigmas[0] * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def replace(x):
        return transform.inverse(kept + transform(x) * omega)

    return consistency_chain(f, x, sigmas, sigma_min, generator, replace, clip)


@torch.no_grad()
def stroke_guided(f, strokes: torch.Tensor, noise: torch.Tensor, sigmas, sigma_min: float = 0.002,
                  generator=None) -> torch.Tensor:
    """SDEdit with a consistency model (CM Section 6): start from the stroke painting at sigmas[0]."""
    sigmas = check_decreasing(sigmas, "sigma")
    return consistency_chain(f, strokes + sigmas[0] * noise, sigmas, sigma_min, generator)


@torch.no_grad()
def denoise(f, noisy: torch.Tensor, sigma: float) -> torch.Tensor:
    """An image with Gaussian noise of known ``sigma``, denoised in one evaluation: f(x, sigma)."""
    return consistency_chain(f, noisy, check_decreasing([sigma], "sigma"))


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two noise tensors at each of ``alpha`` (K,): (K, *z0.shape)."""
    cos = (z0 * z1).sum() / (z0.norm() * z1.norm())
    theta = torch.arccos(cos.clamp(-1, 1))
    a = alpha.reshape(-1, *([1] * z0.ndim)).to(z0)
    return (torch.sin((1 - a) * theta) * z0 + torch.sin(a * theta) * z1) / torch.sin(theta)


@torch.no_grad()
def interpolate(f, z0: torch.Tensor, z1: torch.Tensor, num: int, sigma_max: float = 80.0) -> torch.Tensor:
    """``num`` one-step samples f(sigma_max z, sigma_max) along the great circle from z0 to z1 (C, H, W)."""
    if num < 2:
        raise ConfigError(f"num={num}: interpolation needs at least the two end frames (num >= 2)")
    z = slerp(z0, z1, torch.linspace(0, 1, num))
    return consistency_chain(f, sigma_max * z, [sigma_max])
