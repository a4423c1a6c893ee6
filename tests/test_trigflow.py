"""The TrigFlow parameterisation and its teacher: the teacher (sCM's pretraining loss) against its closed form on
an exact Gaussian, seen as an EDM denoiser, as sCD's velocity, and as the start of sCT (Algorithm 1) through
``python train.py``; the parameterisation's boundary, noising, EDM equivalence, checkpoint metadata, sampling
levels and bad settings."""

import copy
import math

import pytest
import torch
from helpers import TINY
from helpers.builders import randomise, tiny_net
from helpers.launch import run_script
from torch import nn

from cm_lightning.checkpoint import from_meta, upgrade
from cm_lightning.diffusion.objectives.base import StepContext
from cm_lightning.diffusion.objectives.scm import SCM, teacher_velocity
from cm_lightning.diffusion.objectives.trigflow import TrigFlowDenoising
from cm_lightning.diffusion.precond import Precond, edm_denoiser
from cm_lightning.diffusion.trigflow import TrigFlow
from cm_lightning.errors import ConfigError
from cm_lightning.loading import Teacher
from cm_lightning.modules.generative import GenerativeModule

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


def test_a_trigflow_diffusion_model_is_the_edm_denoiser_at_sigma_d_tan_t():
    torch.manual_seed(0)
    net, parameterisation = randomise(tiny_net()).double(), TrigFlow(diffusion=True)
    x_sigma, sigma = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([0.05, 1.0, 20.0], dtype=torch.float64)
    t = torch.atan(sigma / 0.5)
    expected = TrigFlow()(net, torch.cos(t).view(-1, 1, 1, 1) * x_sigma, t)
    torch.testing.assert_close(parameterisation(net, x_sigma, sigma), expected)
    assert not parameterisation.few_step and TrigFlow().few_step


def test_scd_velocity_of_a_trigflow_teacher_is_sigma_d_times_its_f():
    torch.manual_seed(0)
    net = randomise(tiny_net()).double()
    x_t, t = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([0.1, 0.7, 1.4], dtype=torch.float64)
    velocity = teacher_velocity(Teacher(net, TrigFlow(diffusion=True)), x_t, t, None, 0.5)
    torch.testing.assert_close(velocity, 0.5 * TrigFlow().F(net, x_t, t))


def test_boundary_is_exact_at_t_zero():
    f = TrigFlow()
    net = randomise(tiny_net())
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(f(net, x, torch.zeros(3)), x)


def test_trigflow_noising_matches_edm_at_sigma_d_tan_t():
    """x_t / cos t = x0 + sigma_d tan(t) z: EDM's x_sigma at sigma = sigma_d tan t with the same z."""
    f = TrigFlow(sigma_data=0.5)
    x0, z = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randn(4, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 1.0, 1.5], dtype=torch.float64)
    sigma = 0.5 * torch.tan(t)
    x_t = f.add_noise(x0, z, t)
    torch.testing.assert_close(x_t / torch.cos(t).view(-1, 1, 1, 1), edm_denoiser().add_noise(x0, z, sigma))
    assert f.from_sigma(80.0) == pytest.approx(f.t_max) == pytest.approx(math.atan(160.0))
    torch.testing.assert_close(f.from_edm(x0 + sigma.view(-1, 1, 1, 1) * z, t), x_t)


def test_trigflow_with_an_edm_conditioning_equals_the_edm_denoiser():
    """F_trig = -F_edm with EDM's c_noise(sigma_d tan t): the same backbone is the same denoiser."""
    net = randomise(tiny_net()).double()
    x0, z = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.3, 1.2], dtype=torch.float64)
    trig, edm = TrigFlow(noise_kind="adm"), edm_denoiser()
    sigma = 0.5 * torch.tan(t)
    ours = trig(net.float(), trig.add_noise(x0, z, t).float(), t.float())
    theirs = edm(net.float(), (x0 + sigma.view(-1, 1, 1, 1) * z).float(), sigma.float())
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_trigflow_survives_the_checkpoint_metadata():
    f = TrigFlow(t_mid=0.9, noise_kind="adm")
    assert from_meta({"parameterisation": f.to_meta()}) == f
    old = {
        "kind": "consistency",
        "precond": {"sigma_data": 0.5, "eps": 0.002, "noise_kind": "adm"},
        "grid": {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0},
    }
    assert from_meta(upgrade(old)) == Precond()


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(t_mid=1.6), "t_mid=1.6"), (dict(t_mid=0.0), "t_mid=0.0"), (dict(noise_kind="fourier"), "'fourier'")],
)
def test_bad_trigflow_settings_stop_with_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrigFlow(**kwargs)


def test_sampling_levels_are_the_published_ones():
    f = TrigFlow()
    assert f.levels(1) == [pytest.approx(math.atan(80.0 / 0.5))]
    assert f.levels(2) == [pytest.approx(math.atan(160.0)), 1.1]
    three = f.levels(3)
    assert three[0] == pytest.approx(f.t_max) and three[0] > three[1] > three[2] > 0


def test_a_zero_time_scale_stops_with_one_line():
    with pytest.raises(ConfigError, match="time_scale=0"):
        TrigFlow(time_scale=0)


RUN = [*TINY, "logger=none", "trainer.accelerator=cpu"]


@pytest.mark.slow
def test_sct_started_from_a_trigflow_teacher_run_is_the_teachers_function(tmp_path):
    run_script("train.py", "experiment=digits_trigflow", *RUN, f"hydra.run.dir={tmp_path / 'teacher'}")
    ckpt = tmp_path / "teacher/checkpoints/last.ckpt"
    from cm_lightning.loading import load_teacher

    teacher = load_teacher(ckpt)
    assert isinstance(teacher.parameterisation, TrigFlow) and teacher.parameterisation.diffusion
    student = GenerativeModule(
        randomise(copy.deepcopy(teacher.net).requires_grad_(True)),  # the same net config, other weights
        SCM(TrigFlow()),
        optimizer=lambda params: torch.optim.Adam(params),
        teacher_ckpt=str(ckpt),
        init_from_teacher=True,
    )
    net = teacher.net
    x_t, t = torch.randn(2, net.in_channels, net.image_size, net.image_size), torch.tensor([0.3, 1.2])
    torch.testing.assert_close(TrigFlow().F(student.net, x_t, t), TrigFlow().F(teacher.net, x_t, t), rtol=0, atol=0)
    run_script(
        "train.py",
        "experiment=digits_sct",
        *RUN,
        f"model.teacher_ckpt={ckpt}",
        f"hydra.run.dir={tmp_path / 'sct'}",
    )
    assert (tmp_path / "sct/checkpoints/last.ckpt").is_file()
