"""The TrigFlow teacher (sCM's pretraining loss) against its closed form on an exact Gaussian."""

import pytest
import torch
from torch import nn

from cm_lightning.diffusion.objectives.base import StepContext
from cm_lightning.diffusion.objectives.trigflow import TrigFlowDenoising
from cm_lightning.diffusion.precond import TrigFlow
from cm_lightning.errors import ConfigError

SIGMA_D, S = 0.5, 0.8  # the data's standard deviation S differs from sigma_d, so the optimum depends on t


class OptimalVelocity(nn.Module):
    """F*(x / sigma_d, t) = E[v_t | x_t] / sigma_d for x0 ~ N(0, S^2 I): with x_t = cos t x0 + sin t z,
    E[v_t | x_t] = cos t sin t (sigma_d^2 - S^2) / (cos^2 t S^2 + sin^2 t sigma_d^2) x_t."""

    def forward(self, x, t, labels=None):
        c, s = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
        return c * s * (SIGMA_D**2 - S**2) / (c**2 * S**2 + s**2 * SIGMA_D**2) * x


def test_loss_at_the_optimum_of_an_exact_gaussian_is_the_conditional_variance():
    torch.manual_seed(0)
    x0 = S * torch.randn(64, 4, 32, 32)
    objective = TrigFlowDenoising(TrigFlow(), weighting_channels=0)
    g = torch.Generator().manual_seed(1)
    losses = objective.loss(OptimalVelocity(), None, x0, None, StepContext(0, g, lambda b, fn: fn(b), lambda: None))[0]
    g = torch.Generator().manual_seed(1)
    t = torch.atan(torch.exp(-1.0 + 1.4 * torch.randn(64, generator=g)) / SIGMA_D)
    c2, s2 = torch.cos(t) ** 2, torch.sin(t) ** 2
    # Var(v_t | x_t) = S^2 sigma_d^2 / (cos^2 t S^2 + sin^2 t sigma_d^2), per dimension; D = 4096 leaves a
    # relative spread of sqrt(2 / D) ~ 2% per sample.
    expected = S**2 * SIGMA_D**2 / (c2 * S**2 + s2 * SIGMA_D**2)
    torch.testing.assert_close(losses, expected, rtol=0.1, atol=0)
    assert losses.mean() == pytest.approx(expected.mean().item(), rel=0.01)


def test_an_edm_conditioned_parameterisation_is_refused_with_one_line():
    with pytest.raises(ConfigError, match="noise_kind=t"):
        TrigFlowDenoising(TrigFlow(noise_kind="edm"))
