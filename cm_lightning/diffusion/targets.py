"""Target builders: the only thing in which CD and CT (and their successors) differ.

A builder draws the pair of noise levels (t, r) = (sigma_{n+1}, sigma_n) for each sample, builds the
target network's input x_r from the clean image x0 and the shared noise z, and says how the pair is
weighted. The training step (``modules/consistency.py``) does the rest:

    loss = lambda(t, r) * d( f_theta(x0 + t z, t),  sg f_target(x_r, r) )
"""

import torch
from torch import nn

from cm_lightning.diffusion.karras import karras_sigmas
from cm_lightning.diffusion.solvers import get_solver


def uniform_weight(t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """lambda = 1 (CM paper)."""
    return torch.ones_like(t)


def inverse_gap_weight(t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """lambda(sigma_n) = 1 / (sigma_{n+1} - sigma_n) (iCT, Section 3.4; ECT's 1/(t - r))."""
    return 1.0 / (t - r)


WEIGHTINGS = {"uniform": uniform_weight, "inverse_gap": inverse_gap_weight}


class DiscreteTarget(nn.Module):
    """Shared by CD and CT: n ~ U{1, ..., N-1} on the Karras grid of the schedule's current N(k).

    Subclasses define ``target_input(x0, z, t, r, labels)``. A builder that sets ``requires_teacher``
    gets the frozen teacher (from ``model.teacher_ckpt``) as ``self.teacher`` before training.
    """

    uses_online_target = False
    requires_teacher = False

    def __init__(self, schedule, sigma_min=0.002, sigma_max=80.0, rho=7.0, weighting: str = "uniform"):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r} is unknown; choose one of {sorted(WEIGHTINGS)}")
        self.schedule = schedule
        self.grid = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
        self.weight = WEIGHTINGS[weighting]

    def state(self, step: int) -> dict:
        """What the curriculum is at ``step``: the same on every rank, since it depends on the step alone."""
        num_scales, mu = self.schedule(step)
        return {"num_scales": num_scales, "mu": mu}

    def sample_indices(self, num_scales: int, num: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, num_scales - 1, (num,), generator=generator, device=generator.device)

    def sample_levels(self, step: int, num: int, generator: torch.Generator):
        """(t, r) = (sigma_{n+1}, sigma_n) for ``num`` samples."""
        num_scales = self.state(step)["num_scales"]
        sigmas = karras_sigmas(num_scales, **self.grid, device=generator.device)
        n = self.sample_indices(num_scales, num, generator)
        return sigmas[n + 1], sigmas[n]


class CTTarget(DiscreteTarget):
    """Consistency training: x_r = x0 + r z with the same z as the student's input (the Euler step with D = x0)."""

    def target_input(self, x0, z, t, r, labels):
        return x0 + r.view(-1, *([1] * (x0.ndim - 1))) * z


class CDTarget(DiscreteTarget):
    """Consistency distillation: x_r is one step of the frozen teacher's probability-flow ODE from t to r."""

    requires_teacher = True

    def __init__(self, schedule, solver: str = "heun", **grid):
        super().__init__(schedule, **grid)
        self.teacher = None
        self.solve = get_solver(solver)

    def target_input(self, x0, z, t, r, labels):
        x_t = x0 + t.view(-1, *([1] * (x0.ndim - 1))) * z
        with torch.no_grad():
            return self.solve(lambda x, s: self.teacher(x, s, labels), x_t, t, r)
