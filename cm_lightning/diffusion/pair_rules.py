"""Pair rules: the only thing in which CD, CT, iCT and ECT differ.

A pair rule draws the pair of noise levels (t, r) for each sample (t = sigma_{n+1}, r = sigma_n on a
discrete grid, from its curriculum, ``curricula.py``), builds the target network's input x_r from the clean
image x0 and the shared noise z, and says how the pair is weighted. The discrete consistency objective
(``objectives/consistency.py``) does the rest:

    loss = lambda(t, r) * d( f_theta(x0 + t z, t),  sg f_target(x_r, r) ),   target x0 where r = 0
"""

import functools

import torch
from torch import nn

from cm_lightning.diffusion.karras import karras_sigmas, lognormal_index_probs
from cm_lightning.diffusion.shapes import per_sample
from cm_lightning.diffusion.solvers import get_solver
from cm_lightning.errors import ConfigError


def uniform_weight(t: torch.Tensor, r: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """lambda = 1 (CM paper)."""
    return torch.ones_like(t)


def inverse_gap_weight(t: torch.Tensor, r: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """lambda(sigma_n) = 1 / (sigma_{n+1} - sigma_n) (iCT); ECT's w(t, r) = 1 / (t - r) on CIFAR-10."""
    return 1.0 / (t - r)


def inverse_square_weight(t: torch.Tensor, r: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """w(t) = 1 / t^2 + 1 / sigma_data^2, ECT's ImageNet 64 weighting (the EDM weighting, SNR(t) + 1/sigma_data^2)."""
    return 1.0 / t**2 + 1.0 / sigma_data**2


WEIGHTINGS = {"uniform": uniform_weight, "inverse_gap": inverse_gap_weight, "inverse_square": inverse_square_weight}


def make_weighting(name: str, sigma_data: float = 0.5):
    if name not in WEIGHTINGS:
        raise ConfigError(f"model.objective.pair.weighting={name!r} is unknown; choose one of {sorted(WEIGHTINGS)}")
    return functools.partial(WEIGHTINGS[name], sigma_data=sigma_data)


def _check_p_std(p_std: float) -> None:
    if not p_std > 0:
        raise ConfigError(f"model.objective.pair.p_std={p_std}: the lognormal needs a positive P_std (published: 2.0)")


class DiscretePairRule(nn.Module):
    """Shared by CD, CT and iCT: a pair index n on the Karras grid of the curriculum's current N(k),
    n ~ U{1, ..., N-1} unless a subclass draws it otherwise.

    Subclasses define ``target_input(x0, z, t, r, labels)``. A rule that sets ``requires_teacher``
    gets the frozen teacher (from ``model.teacher_ckpt``) as ``self.teacher`` before training.
    """

    uses_online_target = False
    requires_teacher = False
    family = "ct"  # the editing defaults' method family (diffusion/editing.py): every consistency-training variant

    def __init__(
        self, curriculum, sigma_min=0.002, sigma_max=80.0, rho=7.0, weighting: str = "uniform", sigma_data: float = 0.5
    ):
        super().__init__()
        self.curriculum = curriculum
        self.grid = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
        self.weight = make_weighting(weighting, sigma_data)

    def state(self, step: int) -> dict:
        """What the curriculum is at ``step``: the same on every rank, since it depends on the step alone."""
        num_scales, mu = self.curriculum(step)
        return {"num_scales": num_scales, "mu": mu}

    def final_scales(self, max_steps: int) -> int:
        """N at the run's last step: the grid the published editing levels are indices into."""
        return int(self.curriculum(max_steps)[0])

    def sample_indices(self, sigmas: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
        """Pair indices i (the pair sigmas[i], sigmas[i + 1]), uniform over the grid (CM paper)."""
        return torch.randint(0, len(sigmas) - 1, (num,), generator=generator, device=generator.device)

    def sample_levels(self, step: int, num: int, generator: torch.Generator):
        """(t, r) = (sigma_{n+1}, sigma_n) for ``num`` samples."""
        num_scales = self.state(step)["num_scales"]
        sigmas = karras_sigmas(num_scales, **self.grid, device=generator.device)
        n = self.sample_indices(sigmas, num, generator)
        return sigmas[n + 1], sigmas[n]


class CTPairRule(DiscretePairRule):
    """Consistency training: x_r = x0 + r z with the same z as the student's input (the Euler step with D = x0)."""

    def target_input(self, x0, z, t, r, labels):
        return x0 + per_sample(r, x0) * z


class CDPairRule(DiscretePairRule):
    """Consistency distillation: x_r is one step of the frozen teacher's probability-flow ODE from t to r."""

    requires_teacher = True
    family = "cd"

    def __init__(self, curriculum, solver: str = "heun", **grid):
        super().__init__(curriculum, **grid)
        self.teacher = None
        self.solve = get_solver(solver)

    def target_input(self, x0, z, t, r, labels):
        x_t = x0 + per_sample(t, x0) * z
        with torch.no_grad():
            return self.solve(lambda x, s: self.teacher(x, s, labels), x_t, t, r)


class ICTPairRule(CTPairRule):
    """Improved consistency training (Song & Dhariwal 2024): CT's target with the pair index drawn from the
    discrete lognormal (``index_sampling="lognormal"``, P_mean, P_std) over the current grid, and the
    weighting, distance, curriculum and EMA target each chosen in the config so that each can be ablated.
    The target is the online network under stop-gradient when the curriculum's mu is 0 (iCT's choice).
    """

    def __init__(
        self,
        curriculum,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        index_sampling: str = "lognormal",
        weighting: str = "inverse_gap",
        **grid,
    ):
        super().__init__(curriculum, weighting=weighting, **grid)
        if index_sampling not in ("lognormal", "uniform"):
            raise ConfigError(
                f"model.objective.pair.index_sampling={index_sampling!r}; use 'lognormal' (iCT) or 'uniform'"
            )
        _check_p_std(p_std)
        self.p_mean, self.p_std, self.index_sampling = p_mean, p_std, index_sampling
        self.uses_online_target = getattr(curriculum, "mu", None) == 0

    def sample_indices(self, sigmas, num, generator):
        if self.index_sampling == "uniform":
            return super().sample_indices(sigmas, num, generator)
        probs = lognormal_index_probs(sigmas, self.p_mean, self.p_std)
        return torch.multinomial(probs, num, replacement=True, generator=generator)


class ECTPairRule(nn.Module):
    """Easy consistency tuning (Geng et al. 2025): continuous t = exp(P_mean + P_std n), n ~ N(0, 1), and
    r = r(t, stage) from ``ECTCurriculum``; x_r = x0 + r z with the student's z, the online network as target.

    t is clamped to [sigma_min, sigma_max], where the consistency function is defined (about 0.8 % of draws
    with the published P lie outside); r < sigma_min becomes 0, whose target is x0 itself (the module
    substitutes it), since f(x, sigma_min) = x makes a target below the boundary meaningless.
    """

    uses_online_target = True
    requires_teacher = False
    family = "ct"

    def __init__(
        self,
        curriculum,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        weighting: str = "inverse_gap",
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
    ):
        super().__init__()
        _check_p_std(p_std)
        self.curriculum, self.p_mean, self.p_std = curriculum, p_mean, p_std
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.weight = make_weighting(weighting, sigma_data)

    def state(self, step: int) -> dict:
        return {"stage": self.curriculum.stage(step), "mu": 0.0}

    def final_scales(self, max_steps: int) -> int:
        return 0  # continuous t: no discrete grid

    def sample_levels(self, step: int, num: int, generator: torch.Generator):
        n = torch.randn(num, generator=generator, device=generator.device)
        t = torch.exp(self.p_mean + self.p_std * n).clamp(self.sigma_min, self.sigma_max)
        r = self.curriculum.r_of_t(t, self.curriculum.stage(step))
        return t, torch.where(r < self.sigma_min, torch.zeros_like(r), r)

    def target_input(self, x0, z, t, r, labels):
        return x0 + per_sample(r, x0) * z
