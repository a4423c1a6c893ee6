"""Noise grids and the discretisation curricula of the consistency-model papers.

Indexing follows the CM paper: ``sigmas[0]`` is sigma_1 = sigma_min (the smallest level)
and ``sigmas[N - 1]`` is sigma_N = sigma_max. A training pair is (sigma_n, sigma_{n+1}),
i.e. ``(sigmas[i], sigmas[i + 1])`` for ``i`` in ``0 .. N - 2``.
"""

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class FixedSchedule:
    """Constant discretisation N and target EMA rate mu (CD in the CM paper: N=18 or 40, mu=0 or 0.95)."""

    num_scales: int
    mu: float = 0.0

    def __post_init__(self):
        if self.num_scales < 2:
            raise ConfigError(f"num_scales={self.num_scales}: a consistency pair needs N >= 2")
        if not 0.0 <= self.mu < 1.0:
            raise ConfigError(f"mu={self.mu}: the target EMA rate must lie in [0, 1)")

    def __call__(self, step: int) -> tuple[int, float]:
        return self.num_scales, self.mu


_MU_DIVISOR_OFFSET = {"paper": 0, "code": 1}  # subtracted from N(k) in mu(k)'s divisor


@dataclass(frozen=True)
class CMAdaptiveSchedule:
    """The CM paper's CT curricula (Song et al. 2023, Appendix C):

    N(k)  = ceil( sqrt( k/K * ((s1 + 1)^2 - s0^2) + s0^2 ) - 1 ) + 1
    mu(k) = exp( s0 * ln(mu0) / D(k) )

    with D(k) = N(k) for ``mu_divisor="paper"`` and D(k) = N(k) - 1 for ``"code"``, the authors' implementation
    (``cm/script_util.py``, ``create_ema_and_scales_fn``: ``exp(-c / scales)`` before ``scales + 1``) that
    produced the published FIDs. At k = 0, N = s0 = 2: ``paper`` gives mu0, ``code`` mu0^2 (0.9 vs 0.81 for
    CIFAR-10's mu0 = 0.9; 0.95 vs 0.9025 for ImageNet 64 and LSUN).
    """

    s0: int = 2
    s1: int = 150
    mu0: float = 0.95
    total_steps: int = 800_000
    mu_divisor: str = "paper"

    def __post_init__(self):
        if not 1 <= self.s0 <= self.s1:
            raise ConfigError(f"s0={self.s0}, s1={self.s1}: the curriculum needs 1 <= s0 <= s1")
        if not 0.0 < self.mu0 < 1.0:
            raise ConfigError(f"mu0={self.mu0}: must lie in (0, 1)")
        if self.total_steps < 1:
            raise ConfigError(f"total_steps={self.total_steps}: must be positive (set it to trainer.max_steps)")
        if self.mu_divisor not in _MU_DIVISOR_OFFSET:
            raise ConfigError(
                f"model.objective.pair.schedule.mu_divisor={self.mu_divisor!r}: use 'paper' (N(k), the CM paper) "
                "or 'code' (N(k) - 1, the authors' implementation)"
            )
        if self.mu_divisor == "code" and self.s0 < 2:
            raise ConfigError(f"model.objective.pair.schedule: s0={self.s0} with mu_divisor=code divides by "
                              "N(0) - 1 = 0; set s0 >= 2 or mu_divisor=paper")

    def num_scales(self, step: int) -> int:
        k = min(step, self.total_steps)
        inner = k / self.total_steps * ((self.s1 + 1) ** 2 - self.s0**2) + self.s0**2
        return int(math.ceil(math.sqrt(inner) - 1)) + 1

    def __call__(self, step: int) -> tuple[int, float]:
        n = self.num_scales(step)
        return n, math.exp(self.s0 * math.log(self.mu0) / (n - _MU_DIVISOR_OFFSET[self.mu_divisor]))


@dataclass(frozen=True)
class ICTSchedule:
    """iCT's exponential curriculum (Song & Dhariwal 2024, "Improved curriculum for total discretization steps"):

    N(k) = min(s0 * 2^floor(k / K'), s1) + 1,   K' = floor(K / (log2 floor(s1 / s0) + 1))

    and no EMA target, mu(k) = 0 ("Removing EMA for the teacher network"); a non-zero ``mu`` ablates that
    choice. K' is at least one step, so that runs shorter than the number of doublings still reach s1.
    """

    s0: int = 10
    s1: int = 1280
    total_steps: int = 400_000
    mu: float = 0.0

    def __post_init__(self):
        if not 1 <= self.s0 <= self.s1:
            raise ConfigError(
                f"model.objective.pair.schedule: s0={self.s0}, s1={self.s1}; the curriculum doubles N from s0 up to s1, "
                "so it needs 1 <= s0 <= s1 (published: s0=10, s1=1280)"
            )
        if not 0.0 <= self.mu < 1.0:
            raise ConfigError(f"model.objective.pair.schedule.mu={self.mu}: the target EMA rate must lie in [0, 1) (iCT: 0)")
        if self.total_steps < 1:
            raise ConfigError(f"model.objective.pair.schedule.total_steps={self.total_steps}: must be positive")

    @property
    def steps_per_doubling(self) -> int:
        """K' of the curriculum."""
        return max(1, math.floor(self.total_steps / (math.log2(self.s1 // self.s0) + 1)))

    def num_scales(self, step: int) -> int:
        doublings = min(step // self.steps_per_doubling, self.s1.bit_length())  # 2^doublings > s1: capped
        return min(self.s0 * 2**doublings, self.s1) + 1

    def __call__(self, step: int) -> tuple[int, float]:
        return self.num_scales(step), self.mu


def lognormal_index_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """iCT's discrete lognormal over the pairs of an ascending grid (Song & Dhariwal 2024, "Improved noise schedules"):

    p(n) proportional to erf((ln sigma_{n+1} - P_mean) / (sqrt2 P_std)) - erf((ln sigma_n - P_mean) / (sqrt2 P_std)),

    i.e. the lognormal mass of [sigma_n, sigma_{n+1}]; entry i is the pair (sigmas[i], sigmas[i + 1]).
    """
    cdf = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return (mass / mass.sum()).to(sigmas.dtype)


@dataclass(frozen=True)
class ECTSchedule:
    """ECT's stage-wise mapping from t to r (Geng et al. 2025, the mapping function with n(t) = 1 + k sigmoid(-b t)):

    r = max(0, t * (1 - q^-(s+1) * (1 + k * sigmoid(-b t)))),   stage s = floor(step / double_every)

    so t - r shrinks by q at every stage; at stage 0 and small t, r = 0 (the diffusion-pretraining end).
    """

    q: float = 2.0
    k: float = 8.0
    b: float = 1.0
    double_every: int = 25_000

    def __post_init__(self):
        if not self.q > 1:
            raise ConfigError(f"model.objective.pair.schedule.q={self.q}: t - r shrinks by q per stage, so q must exceed 1")
        if self.k < 0 or self.b < 0:
            raise ConfigError(f"model.objective.pair.schedule: k={self.k}, b={self.b}; both must be non-negative (8, 1)")
        if self.double_every < 1:
            raise ConfigError(f"model.objective.pair.schedule.double_every={self.double_every}: must be a positive step count")

    def stage(self, step: int) -> int:
        return step // self.double_every

    def r_of_t(self, t: torch.Tensor, stage: int) -> torch.Tensor:
        shrink = self.q ** -(stage + 1) * (1 + self.k * torch.sigmoid(-self.b * t))
        return (t * (1 - shrink)).clamp(min=0)
