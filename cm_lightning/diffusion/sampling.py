"""Samplers: one-step and multistep consistency sampling (CM Algorithm 1) and the EDM teacher's
Heun/Euler samplers (EDM Algorithm 1). ``f(x, sigma)`` and ``denoiser(x, sigma)`` take a per-sample
sigma of shape (B,). The authors clamp every denoised estimate to [-1, 1]; ``clip`` does the same.
"""

import torch

from cm_lightning.diffusion.karras import karras_sigmas
from cm_lightning.diffusion.solvers import get_solver
from cm_lightning.errors import ConfigError

# EDM's deterministic sampler on CIFAR-10 (EDM Table 2): 18 Heun steps, 35 evaluations; every teacher default.
TEACHER_STEPS = 18


def check_decreasing(sigmas, what: str = "sampling noise levels", sigma_min=None, sigma_max=None) -> list[float]:
    """The levels of CM Algorithm 1 (and 4) as floats: strictly decreasing, positive and, given the model's noise
    range, inside [sigma_min, sigma_max], where the consistency function is defined."""
    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(b >= a for a, b in zip(sigmas, sigmas[1:])) or sigmas[-1] <= 0:
        raise ConfigError(
            f"{what}={sigmas} must be a non-empty, strictly decreasing list of positive values, "
            "e.g. [80.0, 2.5] for two steps"
        )
    if sigma_max is not None and (sigmas[0] > sigma_max or sigmas[-1] < sigma_min):
        raise ConfigError(
            f"{what}={sigmas} leaves the model's noise range [{sigma_min}, {sigma_max}]; keep every level inside it"
        )
    return sigmas


def sigmas_from_indices(ts, num_scales: int, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> list[float]:
    """The authors' ``ts`` convention: indices into a grid of ``num_scales`` points where 0 is sigma_max
    and num_scales - 1 is sigma_min; the last index only ends the chain, so (0, 22, 39) of 40 is two steps.
    """
    ts = [int(t) for t in ts]
    if len(ts) < 2 or ts[-1] != num_scales - 1 or any(b <= a for a, b in zip(ts, ts[1:])) or ts[0] < 0:
        raise ConfigError(
            f"ts={ts} must be strictly increasing indices ending at num_scales-1={num_scales - 1}, e.g. (0, 22, 39)"
        )
    grid = karras_sigmas(num_scales, sigma_min, sigma_max, rho).flip(0)
    return [float(grid[t]) for t in ts[:-1]]


def consistency_chain(f, x, levels, parameterisation, generator=None, project=None, clip: bool = True):
    """CM Algorithm 1 from a state ``x`` already at levels[0]: x = f(x, t_1), then x = f(renoise(x, t_n), t_n)
    for each later level (``parameterisation.renoise``: x + sqrt(t^2 - eps^2) z for EDM/CM, cos(t) x + sin(t) sigma_d z
    for TrigFlow), with an optional projection after every evaluation (the replacement step of Algorithm 4)."""
    ones = torch.ones(x.shape[0], device=x.device)
    for i, t in enumerate(levels):
        if i:
            x = parameterisation.renoise(
                x, t, torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            )
        x = f(x, t * ones)
        if clip:
            x = x.clamp(-1, 1)
        if project is not None:
            x = project(x)
    return x


@torch.no_grad()
def multistep_sample(f, z: torch.Tensor, levels, parameterisation, generator=None, clip: bool = True):
    """CM Algorithm 1 from pure noise: x = f(x_T, T), x_T = ``parameterisation.add_noise(0, z, T)``, then re-noise."""
    levels = check_decreasing(levels)
    return consistency_chain(
        f, parameterisation.add_noise(torch.zeros_like(z), z, levels[0]), levels, parameterisation, generator, clip=clip
    )


def teacher_sigmas(steps: int, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> list[float]:
    """EDM's sampling grid: ``steps`` descending Karras levels followed by 0."""
    return karras_sigmas(steps, sigma_min, sigma_max, rho).flip(0).tolist() + [0.0]


@torch.no_grad()
def ode_sample(denoiser, z: torch.Tensor, steps: int = TEACHER_STEPS, solver: str = "heun", clip: bool = True, **grid):
    """Deterministic EDM sampler over ``steps`` levels: Heun (2 steps - 1 evaluations) or Euler (steps)."""
    step = get_solver(solver)
    sigmas = teacher_sigmas(steps, **grid)
    D = (lambda x, s: denoiser(x, s).clamp(-1, 1)) if clip else denoiser
    ones = torch.ones(z.shape[0], device=z.device)
    x = sigmas[0] * z
    for s, s_next in zip(sigmas, sigmas[1:]):
        x = step(D, x, s * ones, s_next * ones)
    return x.clamp(-1, 1) if clip else x
