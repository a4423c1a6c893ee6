"""The curricula of the discrete consistency methods: what N(k) (the grid size) and mu(k) (the target network's
EMA rate) are at optimiser step k, or ECT's stage-wise r(t). A pair rule (``pair_rules.py``) asks its curriculum
at every step; the state depends on the step alone, so it is the same on every rank and after a resume.
"""

import math
from dataclasses import dataclass

import torch

from cm_lightning.errors import ConfigError

KEY = "model.objective.pair.curriculum"


@dataclass(frozen=True)
class FixedCurriculum:
    """Constant discretisation N and target EMA rate mu (CD in the CM paper: N=18 or 40, mu=0 or 0.95)."""

    num_scales: int
    mu: float = 0.0

    def __post_init__(self):
        if self.num_scales < 2:
            raise ConfigError(f"{KEY}.num_scales={self.num_scales}: a consistency pair needs N >= 2")
        if not 0.0 <= self.mu < 1.0:
            raise ConfigError(f"{KEY}.mu={self.mu}: the target EMA rate must lie in [0, 1)")

    def __call__(self, step: int) -> tuple[int, float]:
        return self.num_scales, self.mu


_MU_DIVISOR_OFFSET = {"paper": 0, "code": 1}  # subtracted from N(k) in mu(k)'s divisor


@dataclass(frozen=True)
class CMCurriculum:
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
            raise ConfigError(f"{KEY}: s0={self.s0}, s1={self.s1}; the curriculum needs 1 <= s0 <= s1")
        if not 0.0 < self.mu0 < 1.0:
            raise ConfigError(f"{KEY}.mu0={self.mu0}: must lie in (0, 1)")
        if self.total_steps < 1:
            raise ConfigError(f"{KEY}.total_steps={self.total_steps}: must be positive (set it to trainer.max_steps)")
        if self.mu_divisor not in _MU_DIVISOR_OFFSET:
            raise ConfigError(
                f"{KEY}.mu_divisor={self.mu_divisor!r}: use 'paper' (N(k), the CM paper) "
                "or 'code' (N(k) - 1, the authors' implementation)"
            )
        if self.mu_divisor == "code" and self.s0 < 2:
            raise ConfigError(
                f"{KEY}: s0={self.s0} with mu_divisor=code divides by N(0) - 1 = 0; set s0 >= 2 or mu_divisor=paper"
            )

    def num_scales(self, step: int) -> int:
        k = min(step, self.total_steps)
        inner = k / self.total_steps * ((self.s1 + 1) ** 2 - self.s0**2) + self.s0**2
        return int(math.ceil(math.sqrt(inner) - 1)) + 1

    def __call__(self, step: int) -> tuple[int, float]:
        n = self.num_scales(step)
        return n, math.exp(self.s0 * math.log(self.mu0) / (n - _MU_DIVISOR_OFFSET[self.mu_divisor]))


@dataclass(frozen=True)
class ICTCurriculum:
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
                f"{KEY}: s0={self.s0}, s1={self.s1}; the curriculum doubles N from s0 up to s1, "
                "so it needs 1 <= s0 <= s1 (published: s0=10, s1=1280)"
            )
        if not 0.0 <= self.mu < 1.0:
            raise ConfigError(f"{KEY}.mu={self.mu}: the target EMA rate must lie in [0, 1) (iCT: 0)")
        if self.total_steps < 1:
            raise ConfigError(f"{KEY}.total_steps={self.total_steps}: must be positive")

    @property
    def steps_per_doubling(self) -> int:
        """K' of the curriculum."""
        return max(1, math.floor(self.total_steps / (math.log2(self.s1 // self.s0) + 1)))

    def num_scales(self, step: int) -> int:
        doublings = min(step // self.steps_per_doubling, self.s1.bit_length())  # 2^doublings > s1: capped
        return min(self.s0 * 2**doublings, self.s1) + 1

    def __call__(self, step: int) -> tuple[int, float]:
        return self.num_scales(step), self.mu


@dataclass(frozen=True)
class ECTCurriculum:
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
            raise ConfigError(f"{KEY}.q={self.q}: t - r shrinks by q per stage, so q must exceed 1")
        if self.k < 0 or self.b < 0:
            raise ConfigError(f"{KEY}: k={self.k}, b={self.b}; both must be non-negative (8, 1)")
        if self.double_every < 1:
            raise ConfigError(f"{KEY}.double_every={self.double_every}: must be a positive step count")

    def stage(self, step: int) -> int:
        return step // self.double_every

    def r_of_t(self, t: torch.Tensor, stage: int) -> torch.Tensor:
        shrink = self.q ** -(stage + 1) * (1 + self.k * torch.sigmoid(-self.b * t))
        return (t * (1 - shrink)).clamp(min=0)
