import math

import pytest
import torch

from cm_lightning.diffusion.curricula import FixedCurriculum
from cm_lightning.diffusion.pair_rules import CDPairRule, CTPairRule, inverse_gap_weight
from cm_lightning.diffusion.solvers import euler_step, heun_step

S2 = 0.7**2  # variance of Gaussian data: D(x, sigma) = s^2 / (s^2 + sigma^2) x exactly


def gaussian_denoiser(x, sigma, labels=None):
    s = sigma.view(-1, 1, 1, 1)
    return S2 / (S2 + s**2) * x


def test_heun_matches_hand_written_step():
    x = torch.randn(3, 1, 4, 4)
    t, r = torch.tensor([2.0, 5.0, 0.5]), torch.tensor([1.5, 4.0, 0.3])
    tt, rr = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    d1 = (x - gaussian_denoiser(x, t)) / tt
    x1 = x + (rr - tt) * d1
    d2 = (x1 - gaussian_denoiser(x1, r)) / rr
    expected = x + (rr - tt) * (d1 + d2) / 2
    torch.testing.assert_close(heun_step(gaussian_denoiser, x, t, r), expected)
    torch.testing.assert_close(euler_step(gaussian_denoiser, x, t, r), x1)


def test_heun_is_second_order_on_the_exact_flow():
    # For Gaussian data the ODE solution is x(sigma) = x(t) sqrt(s^2 + sigma^2) / sqrt(s^2 + t^2).
    x = torch.randn(1, 1, 2, 2)
    t, r = torch.tensor([1.0]), torch.tensor([0.9])
    exact = x * math.sqrt(S2 + 0.81) / math.sqrt(S2 + 1.0)
    heun_err = (heun_step(gaussian_denoiser, x, t, r) - exact).abs().max()
    euler_err = (euler_step(gaussian_denoiser, x, t, r) - exact).abs().max()
    assert heun_err < euler_err / 10


def test_cd_target_is_a_teacher_heun_step():
    target = CDPairRule(FixedCurriculum(18, 0.95), solver="heun")
    target.teacher = gaussian_denoiser
    x0, z = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    t, r = torch.tensor([3.0, 0.8]), torch.tensor([2.0, 0.5])
    x_t = x0 + t.view(-1, 1, 1, 1) * z
    torch.testing.assert_close(target.target_input(x0, z, t, r, None), heun_step(gaussian_denoiser, x_t, t, r))


def test_ct_target_uses_the_same_noise():
    target = CTPairRule(FixedCurriculum(18, 0.95))
    x0, z = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    r = torch.tensor([0.1, 2.0])
    torch.testing.assert_close(target.target_input(x0, z, None, r, None), x0 + r.view(-1, 1, 1, 1) * z)


def test_levels_are_adjacent_grid_points():
    target = CTPairRule(FixedCurriculum(10, 0.9))
    g = torch.Generator().manual_seed(0)
    t, r = target.sample_levels(0, 1000, g)
    from cm_lightning.diffusion.karras import karras_sigmas

    grid = karras_sigmas(10)
    idx_t = torch.searchsorted(grid, t)
    assert torch.equal(grid[idx_t], t) and torch.equal(grid[idx_t - 1], r)
    assert set(idx_t.tolist()) == set(range(1, 10))  # every pair n = 1..N-1 is drawn


def test_inverse_gap_weight():
    assert inverse_gap_weight(torch.tensor([3.0]), torch.tensor([1.0])).item() == pytest.approx(0.5)


def test_unknown_weighting_and_solver():
    with pytest.raises(ValueError, match="'bogus'"):
        CTPairRule(FixedCurriculum(10), weighting="bogus")
    with pytest.raises(ValueError, match="'rk4'"):
        CDPairRule(FixedCurriculum(10), solver="rk4")
