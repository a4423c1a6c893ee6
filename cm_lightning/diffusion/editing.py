"""Zero-shot editing with a consistency function f(x, sigma) (CM paper, Section 6 and Algorithm 4).

Every routine runs the same chain (``sampling.consistency_chain``): evaluate f at a noise level, clamp to
[-1, 1] as the authors' samplers do, optionally project back onto the constraint, and re-noise to the next
level (CM Algorithm 1, through the ``parameterisation``: sqrt(sigma_n^2 - eps^2) fresh noise for EDM/CM,
cos/sin mixing for TrigFlow). Levels are the parameterisation's own (sigma, or TrigFlow's t). ``f`` takes a
per-sample level of shape (B,); bind class labels into it (``lambda x, s: sampler.denoise(x, s, labels)``).

Algorithm 4 (y the reference, A orthogonal, Omega = 1 where A x is to be generated):

    y <- A^T[(A y)(1 - Omega)];  x <- y + sigma_1 z
    for each sigma_n: x <- f(x, sigma_n); x <- A^T[(A y)(1 - Omega) + (A x) Omega]; re-noise
so (A x)(1 - Omega) = (A y)(1 - Omega) holds exactly for the output.
"""

import torch

from cm_lightning.diffusion.sampling import check_decreasing, consistency_chain, sigmas_from_indices
from cm_lightning.errors import ConfigError

# The authors' published multistep settings (launch.sh; ternary-searched midpoints): ts indices into a
# grid of num_scales points, keyed by (method, num_scales). A model trained on another grid gets its
# method's ImageNet-64 entry evaluated on its own sigma_min, sigma_max, rho.
PUBLISHED_TS = {
    ("cd", 40): (0, 22, 39),  # CD, ImageNet 64
    ("ct", 201): (0, 106, 200),  # CT, ImageNet 64
    ("ct", 151): (0, 67, 150),  # CT, LSUN Bedroom 256
}
FALLBACK_GRID = {"cd": 40, "ct": 201}


def published_edit_sigmas(method: str, num_scales: int, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> list[float]:
    """Default noise levels for editing: the published two-step setting for ``method`` ('cd' or 'ct')
    on a grid of ``num_scales`` points, or the method's ImageNet-64 setting when none was published."""
    if (method, num_scales) not in PUBLISHED_TS:
        num_scales = FALLBACK_GRID[method]
    return sigmas_from_indices(PUBLISHED_TS[method, num_scales], num_scales, sigma_min, sigma_max, rho)


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
def edit(
    f, y: torch.Tensor, transform, omega: torch.Tensor, levels, parameterisation, generator=None, clip: bool = True
) -> torch.Tensor:
    """CM Algorithm 4 for an orthogonal ``transform`` (A and its transpose A.inverse) and mask ``omega``."""
    check_mask(omega, y)
    levels = check_decreasing(levels, "edit_sigmas")
    omega = omega.to(y)
    kept = transform(y) * (1 - omega)
    x = transform.inverse(kept)
    x = parameterisation.add_noise(
        x, torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype), levels[0]
    )

    def replace(x):
        return transform.inverse(kept + transform(x) * omega)

    return consistency_chain(f, x, levels, parameterisation, generator, replace, clip)


@torch.no_grad()
def stroke_guided(
    f, strokes: torch.Tensor, noise: torch.Tensor, levels, parameterisation, generator=None, clip: bool = True
) -> torch.Tensor:
    """SDEdit with a consistency model (CM Section 6): start from the stroke painting noised to levels[0]."""
    levels = check_decreasing(levels, "sigma")
    return consistency_chain(
        f, parameterisation.add_noise(strokes, noise, levels[0]), levels, parameterisation, generator, clip=clip
    )


@torch.no_grad()
def denoise(f, noisy: torch.Tensor, sigma: float, parameterisation) -> torch.Tensor:
    """An image x0 + sigma z with noise of known ``sigma`` (EDM's scaling), denoised in one evaluation at the
    parameterisation's level for sigma."""
    t = parameterisation.from_sigma(check_decreasing([sigma], "sigma")[0])
    return consistency_chain(f, parameterisation.from_edm(noisy, t), [t], parameterisation)


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two noise tensors at each of ``alpha`` (K,): (K, *z0.shape)."""
    cos = (z0 * z1).sum() / (z0.norm() * z1.norm())
    theta = torch.arccos(cos.clamp(-1, 1))
    a = alpha.reshape(-1, *([1] * z0.ndim)).to(z0)
    return (torch.sin((1 - a) * theta) * z0 + torch.sin(a * theta) * z1) / torch.sin(theta)


@torch.no_grad()
def interpolate(f, z0: torch.Tensor, z1: torch.Tensor, num: int, parameterisation, clip: bool = True) -> torch.Tensor:
    """``num`` one-step samples from t_max along the great circle from z0 to z1 (C, H, W); ``clip=False`` for
    latents, which have no [-1, 1] range."""
    if num < 2:
        raise ConfigError(f"num={num}: interpolation needs at least the two end frames (num >= 2)")
    z = slerp(z0, z1, torch.linspace(0, 1, num))
    start = parameterisation.add_noise(torch.zeros_like(z), z, parameterisation.t_max)
    return consistency_chain(f, start, [parameterisation.t_max], parameterisation, clip=clip)
