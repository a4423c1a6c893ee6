"""Noise grids and the discretisation curricula of the consistency-model papers.

Indexing follows the CM paper: ``sigmas[0]`` is sigma_1 = sigma_min (the smallest level)
and ``sigmas[N - 1]`` is sigma_N = sigma_max. A training pair is (sigma_n, sigma_{n+1}),
i.e. ``(sigmas[i], sigmas[i + 1])`` for ``i`` in ``0 .. N - 2``.
"""

import math
from dataclasses import dataclass

import torch


def karras_sigmas(
    num: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, device=None
) -> torch.Tensor:
    """Karras et al. (EDM, eq. 5) noise levels, ascending.

    sigma_i = (sigma_min^(1/rho) + (i-1)/(N-1) * (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, i = 1..N.
    Computed in float64 so that the endpoints are sigma_min and sigma_max to float32 precision.
    """
    if num < 2:
        raise ValueError(f"a Karras grid needs at least 2 points, got N={num}")
    ramp = torch.linspace(0, 1, num, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (lo + ramp * (hi - lo)) ** rho
    sigmas[0], sigmas[-1] = sigma_min, sigma_max
    return sigmas.float()


@dataclass(frozen=True)
class FixedSchedule:
    """Constant discretisation N and target EMA rate mu (CD in the CM paper: N=18 or 40, mu=0 or 0.95)."""

    num_scales: int
    mu: float = 0.0

    def __post_init__(self):
        if self.num_scales < 2:
            raise ValueError(f"num_scales={self.num_scales}: a consistency pair needs N >= 2")
        if not 0.0 <= self.mu < 1.0:
            raise ValueError(f"mu={self.mu}: the target EMA rate must lie in [0, 1)")

    def __call__(self, step: int) -> tuple[int, float]:
        return self.num_scales, self.mu


@dataclass(frozen=True)
class CMAdaptiveSchedule:
    """The CM paper's CT curricula (Song et al. 2023, Appendix C):

    N(k)  = ceil( sqrt( k/K * ((s1 + 1)^2 - s0^2) + s0^2 ) - 1 ) + 1
    mu(k) = exp( s0 * ln(mu0) / N(k) )

    The authors' PyTorch code divides by N(k) - 1 in mu(k); we follow the paper's formula.
    """

    s0: int = 2
    s1: int = 150
    mu0: float = 0.95
    total_steps: int = 800_000

    def __post_init__(self):
        if not 1 <= self.s0 <= self.s1:
            raise ValueError(f"s0={self.s0}, s1={self.s1}: the curriculum needs 1 <= s0 <= s1")
        if not 0.0 < self.mu0 < 1.0:
            raise ValueError(f"mu0={self.mu0}: must lie in (0, 1)")
        if self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps}: must be positive (set it to trainer.max_steps)")

    def num_scales(self, step: int) -> int:
        k = min(step, self.total_steps)
        inner = k / self.total_steps * ((self.s1 + 1) ** 2 - self.s0**2) + self.s0**2
        return int(math.ceil(math.sqrt(inner) - 1)) + 1

    def __call__(self, step: int) -> tuple[int, float]:
        n = self.num_scales(step)
        return n, math.exp(self.s0 * math.log(self.mu0) / n)
