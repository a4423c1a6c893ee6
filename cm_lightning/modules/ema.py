"""Moving averages of network weights: the CM target network, the constant-rate evaluation EMAs and EDM2's
power-function EMAs (Karras et al. 2024, Section 3.1 and Appendix C)."""

import math

import numpy as np
import torch
from torch import nn

from cm_lightning.errors import ConfigError

# sigma_rel of a power function profile is below sqrt(1/12) for every gamma > 0 (eq. 123 at gamma = 0).
MAX_STD = math.sqrt(1 / 12)


@torch.no_grad()
def ema_update_(average: nn.Module, source: nn.Module, rate: float) -> None:
    """average <- rate * average + (1 - rate) * source, parameter by parameter; buffers are copied."""
    avg = [p for p in average.parameters()]
    src = [p.detach() for p in source.parameters()]
    if rate == 0.0:
        torch._foreach_copy_(avg, src)
    else:
        torch._foreach_lerp_(avg, src, 1.0 - rate)
    for b_avg, b_src in zip(average.buffers(), source.buffers()):
        b_avg.copy_(b_src)


def gamma_to_std(gamma: float) -> float:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))), the profile's width relative to its length
    (eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_to_gamma(std: float) -> float:
    """The exponent gamma of the power function profile of width ``std``: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - std^-2) gamma + (12 - std^-2) = 0 (eq. 126, Algorithm 2)."""
    if not 0 < std < MAX_STD:
        raise ConfigError(
            f"model.ema_stds contains {std}: a power-function EMA's relative std must lie in (0, {MAX_STD:.4f}) "
            "(EDM2 keeps 0.050 and 0.100)"
        )
    s = std**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots.real[np.abs(roots.imag) < 1e-9].max())


def power_beta(gamma: float, step: int) -> float:
    """The rate after the ``step``-th update (1 for the first) that tracks the power function profile
    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1): beta = (1 - 1 / step)^(gamma + 1) (eq. 127). The first
    update copies the weights; the average then weights update j by (1 - (1 - 1/j)^(gamma+1)) (j / t)^(gamma+1)."""
    return (1.0 - 1.0 / max(step, 1)) ** (gamma + 1)


def profile_inner_products(a_steps, a_stds, b_steps, b_stds) -> np.ndarray:
    """<p_a, p_b> = integral of p_a(tau) p_b(tau) over tau for power function profiles
    p(tau) = (gamma + 1) tau^gamma / T^(gamma + 1) on [0, T], one row per a and one column per b (EDM2
    Appendix C.3, eq. 151): with T_a <= T_b it is (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1)
    (T_a / T_b)^gamma_b / T_b, and symmetrically."""
    ta, tb = np.float64(a_steps)[:, None], np.float64(b_steps)[None, :]
    ga = np.array([std_to_gamma(s) for s in np.ravel(a_stds)])[:, None]
    gb = np.array([std_to_gamma(s) for s in np.ravel(b_stds)])[None, :]
    ratio = np.where(ta <= tb, (ta / tb) ** gb, (tb / ta) ** ga)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * ratio / np.maximum(ta, tb)


def posthoc_coefficients(steps, stds, out_step: int, out_std: float) -> np.ndarray:
    """Weights x_i of the stored averages (one per snapshot step and std) whose sum best matches, in the L2 sense
    over tau, the power function EMA of ``out_std`` at ``out_step``: the normal equations A x = b with A the
    snapshots' profile inner products and b their inner products with the target (EDM2 Algorithm 3), then
    scaled to sum to one so that the result is an average of weights."""
    a = profile_inner_products(steps, stds, steps, stds)
    b = profile_inner_products(steps, stds, [out_step], [out_std])[:, 0]
    x = np.linalg.solve(a, b)
    return x / x.sum()
