import pytest
import torch

from cm_lightning.diffusion.precond import consistency_function
from cm_lightning.diffusion.sampling import (
    check_decreasing,
    multistep_sample,
    ode_sample,
    sigmas_from_indices,
)


def test_sigmas_from_the_authors_indices():
    lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
    sigmas = sigmas_from_indices([0, 22, 39], 40)
    assert sigmas[0] == pytest.approx(80.0)
    assert sigmas[1] == pytest.approx((hi + 22 / 39 * (lo - hi)) ** 7, rel=1e-5)
    assert len(sigmas) == 2  # the last index only ends the chain
    with pytest.raises(ValueError, match="ending at num_scales-1=39"):
        sigmas_from_indices([0, 22], 40)


def test_sampling_plans_must_strictly_decrease():
    for bad in ([1.0, 2.0], [2.0, 2.0], [], [1.0, 0.0]):
        with pytest.raises(ValueError, match="strictly decreasing"):
            check_decreasing(bad)


def test_multistep_follows_algorithm_1():
    calls = []

    def f(x, sigma):
        calls.append((x.clone(), sigma.clone()))
        return torch.zeros_like(x)  # a consistency function that always answers 0

    z = torch.randn(3, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    multistep_sample(f, z, [80.0, 2.0], consistency_function(), generator=g)
    torch.testing.assert_close(calls[0][0], 80.0 * z)
    torch.testing.assert_close(calls[0][1], torch.full((3,), 80.0))
    expected_noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(calls[1][0], (2.0**2 - 0.002**2) ** 0.5 * expected_noise)


def test_teacher_ode_reaches_the_data_point():
    point = torch.full((1, 1, 4, 4), 0.3)
    denoiser = lambda x, sigma: point.expand_as(x)  # noqa: E731  (data = a single point)
    z = torch.randn(2, 1, 4, 4)
    for solver in ("heun", "euler"):
        torch.testing.assert_close(ode_sample(denoiser, z, steps=18, solver=solver), point.expand(2, -1, -1, -1))
