"""The Karras noise grid (EDM, eq. 5) and iCT's discrete lognormal over its pairs.

Indexing follows the CM paper: ``sigmas[0]`` is sigma_1 = sigma_min (the smallest level)
and ``sigmas[N - 1]`` is sigma_N = sigma_max. A training pair is (sigma_n, sigma_{n+1}),
i.e. ``(sigmas[i], sigmas[i + 1])`` for ``i`` in ``0 .. N - 2``.
"""

import math

import torch

from cm_lightning.errors import ConfigError


def karras_sigmas(
    num: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, device=None
) -> torch.Tensor:
    """Karras et al. (EDM, eq. 5) noise levels, ascending.

    sigma_i = (sigma_min^(1/rho) + (i-1)/(N-1) * (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, i = 1..N.
    Computed in float64 so that the endpoints are sigma_min and sigma_max to float32 precision.
    """
    if num < 2:
        raise ConfigError(f"a Karras grid needs at least 2 points, got N={num}")
    ramp = torch.linspace(0, 1, num, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (lo + ramp * (hi - lo)) ** rho
    sigmas[0], sigmas[-1] = sigma_min, sigma_max
    return sigmas.float()


def lognormal_index_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """iCT's discrete lognormal over the pairs of an ascending grid (Song & Dhariwal 2024, "Improved noise schedules"):

    p(n) proportional to erf((ln sigma_{n+1} - P_mean) / (sqrt2 P_std)) - erf((ln sigma_n - P_mean) / (sqrt2 P_std)),

    i.e. the lognormal mass of [sigma_n, sigma_{n+1}]; entry i is the pair (sigmas[i], sigmas[i + 1]).
    """
    cdf = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return (mass / mass.sum()).to(sigmas.dtype)
