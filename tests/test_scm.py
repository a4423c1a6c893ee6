"""sCM (sCT, sCD) against its formulas: the JVP, the teacher's velocity on an analytic Gaussian, and the loss.
(The TrigFlow parameterisation itself: test_trigflow.py.)"""

import math

import pytest
import torch
from helpers.builders import randomise, tiny_net

from cm_lightning.diffusion.jvp import jvp
from cm_lightning.diffusion.objectives.base import StepContext
from cm_lightning.diffusion.objectives.scm import SCM, tangent, teacher_velocity
from cm_lightning.diffusion.precond import edm_denoiser
from cm_lightning.diffusion.trigflow import TrigFlow
from cm_lightning.errors import ConfigError
from cm_lightning.modules.generative import GenerativeModule


def test_jvp_equals_a_central_finite_difference_in_float64():
    torch.manual_seed(0)
    net = randomise(tiny_net(), std=0.2).double().eval()  # attention at 4x4 inside
    f = TrigFlow()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.4, 1.1], dtype=torch.float64)
    dx, dt = torch.randn_like(x), torch.ones_like(t)
    F = lambda x, t: f.F(net, x, t).double()  # noqa: E731
    _, tangent_out = jvp(F, (x, t), (dx, dt))
    h = 1e-6
    with torch.no_grad():
        fd = (F(x + h * dx, t + h * dt) - F(x - h * dx, t - h * dt)) / (2 * h)
    assert tangent_out.requires_grad is False
    rel = (tangent_out - fd).norm() / fd.norm()
    assert rel < 1e-6


def test_teacher_velocity_of_an_exact_gaussian_teacher_is_the_analytic_derivative():
    """Data N(0, s^2 I): EDM's denoiser is s^2 / (s^2 + sigma^2) x, and along TrigFlow's PF-ODE x_t scales with
    std(t) = sqrt(cos^2 t s^2 + sin^2 t sigma_d^2), so dx_t/dt = x_t d ln std(t) / dt."""
    s, sd = 0.7, 0.5
    teacher = lambda x, sigma, labels: s**2 / (s**2 + sigma.view(-1, 1, 1, 1) ** 2) * x  # noqa: E731
    x_t = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.2, 0.8, 1.4], dtype=torch.float64)
    ours = teacher_velocity(teacher, x_t, t, None, sd)
    var = torch.cos(t) ** 2 * s**2 + torch.sin(t) ** 2 * sd**2
    analytic = x_t * (torch.sin(t) * torch.cos(t) * (sd**2 - s**2) / var).view(-1, 1, 1, 1)
    torch.testing.assert_close(ours, analytic)


def test_tangent_is_the_published_formula_normalised_per_sample():
    F, dF, x_t, dx = (torch.randn(2, 1, 4, 4, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([0.3, 1.0], dtype=torch.float64)
    out = tangent(F, dF, x_t, dx, t, sigma_data=0.5, r=0.5, c=0.1)
    for i in range(2):
        c, s = math.cos(t[i]), math.sin(t[i])
        g = -(c**2) * (0.5 * F[i] - dx[i]) - 0.5 * c * s * (x_t[i] + 0.5 * dF[i])
        torch.testing.assert_close(out[i], g / (g.norm() + 0.1))


def test_loss_at_initialisation_is_the_tangent_term_and_gradients_reach_the_weighting():
    torch.manual_seed(0)
    module = GenerativeModule(
        randomise(tiny_net()), SCM(TrigFlow(), warmup_steps=0), optimizer=lambda params: torch.optim.Adam(params)
    )
    x0 = torch.randn(4, 1, 8, 8).clamp(-1, 1)
    losses, extra = module.losses(x0, None, 0)
    # w = 0 at initialisation and F_theta = F^-, so the loss is ||g||^2 / D with ||g|| < 1.
    assert losses.shape == (4,) and (losses > 0).all() and (losses < 1 / 64).all()
    losses.mean().backward()
    assert module.objective.weighting.linear.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.net.parameters())
    assert extra["weight"] == pytest.approx(1.0)


def test_bad_scm_settings_stop_with_one_line():
    with pytest.raises(ConfigError, match="p_std=0"):
        SCM(TrigFlow(), p_std=0)
    with pytest.raises(ConfigError, match="TrigFlow"):
        SCM(edm_denoiser())


def test_a_layer_without_forward_mode_ad_stops_with_one_line():
    x = torch.randn(1, 1, 4, 8)
    attention = lambda x: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(x, x, x)[0]  # noqa: E731
    with pytest.raises(ConfigError, match="_scaled_dot_product_flash_attention_for_cpu, which has no forward-mode AD"):
        jvp(attention, (x,), (x,))


def test_double_normalisation_keeps_the_state_dict_and_pixel_normalises_scale_and_shift():
    torch.manual_seed(0)
    plain = randomise(tiny_net())
    double = tiny_net(double_norm=True)
    double.load_state_dict(plain.state_dict())  # the same keys: checkpoints move between the two
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 1.2])
    before = double(x, t)
    assert not torch.allclose(plain(x, t), before)
    # pnorm(s(t)) and pnorm(b(t)) do not change when the embedding's projection is scaled.
    with torch.no_grad():
        for block in double.modules():
            if hasattr(block, "emb_layers"):
                block.emb_layers[1].weight.mul_(3.0)
                block.emb_layers[1].bias.mul_(3.0)
    torch.testing.assert_close(double(x, t), before, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="use_scale_shift_norm=true"):
        tiny_net(use_scale_shift_norm=False, double_norm=True)


def _ctx(seed: int = 0) -> StepContext:
    return StepContext(0, torch.Generator().manual_seed(seed), lambda b, fn: fn(b), lambda: None)


def _drawn(objective: SCM, x0: torch.Tensor, seed: int = 0):
    """The (t, x_t, dx_t/dt) that ``objective.loss`` draws from ``_ctx(seed)`` (sCT's tangent)."""
    g = torch.Generator().manual_seed(seed)
    tau = objective.p_mean + objective.p_std * torch.randn(x0.shape[0], generator=g)
    z = torch.randn(x0.shape, generator=g)
    t = torch.atan(torch.exp(tau) / 0.5)
    c, s = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    return t, c * x0 + s * 0.5 * z, c * 0.5 * z - s * x0


def test_rms_tangent_norm_divides_by_the_norm_over_sqrt_d():
    F, dF, x_t, dx = (torch.randn(2, 1, 4, 4, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([0.3, 1.0], dtype=torch.float64)
    out = tangent(F, dF, x_t, dx, t, sigma_data=0.5, r=1.0, c=0.1, norm="rms")
    for i in range(2):
        c, s = math.cos(t[i]), math.sin(t[i])
        g = -(c**2) * (0.5 * F[i] - dx[i]) - c * s * (x_t[i] + 0.5 * dF[i])
        torch.testing.assert_close(out[i], g / (g.norm() / 4 + 0.1))


def test_prior_weighting_divides_the_loss_by_sigma_d_tan_t():
    torch.manual_seed(0)
    net, x0 = randomise(tiny_net()), torch.randn(3, 1, 8, 8).clamp(-1, 1)
    plain, prior = SCM(TrigFlow(), warmup_steps=0), SCM(TrigFlow(), warmup_steps=0, prior_weighting=True)
    t = _drawn(plain, x0)[0]
    torch.testing.assert_close(
        prior.loss(net, None, x0, None, _ctx())[0], plain.loss(net, None, x0, None, _ctx())[0] / (0.5 * torch.tan(t))
    )


@pytest.mark.parametrize("form", ["linear", "mlp"])
def test_learned_weighting_enters_as_exp_w_times_the_distance_minus_w(form):
    torch.manual_seed(0)
    net, x0 = randomise(tiny_net()), torch.randn(3, 1, 8, 8).clamp(-1, 1)
    objective = SCM(TrigFlow(), warmup_steps=0, weighting=form)
    unweighted = objective.loss(net, None, x0, None, _ctx())[0]
    last = objective.weighting.linear if form == "linear" else objective.weighting.linear[-1]
    with torch.no_grad():
        last.bias.fill_(0.3)
    torch.testing.assert_close(objective.loss(net, None, x0, None, _ctx())[0], math.exp(0.3) * unweighted - 0.3)
    assert len(list(objective.weighting.parameters())) == (2 if form == "linear" else 4)


def test_under_bf16_autocast_the_jvp_is_fp32_and_f_theta_minus_f_minus_is_zero():
    torch.manual_seed(0)
    net, x0 = randomise(tiny_net()), torch.randn(3, 1, 8, 8).clamp(-1, 1)
    objective, parameterisation = SCM(TrigFlow(), warmup_steps=0), TrigFlow()
    t, x_t, dxt_dt = _drawn(objective, x0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dF_dt = objective.time_derivative(net, x_t, t, dxt_dt, None)
        F_theta = parameterisation.F(net, x_t, t, None)
        losses = objective.loss(net, None, x0, None, _ctx())[0]
    assert dF_dt.dtype == torch.float32
    F_jvp = parameterisation.F(net, x_t, t, None)  # what the JVP's own forward gives: fp32, not the bf16 F_theta
    assert not torch.equal(F_jvp, F_theta)
    g = tangent(F_theta, dF_dt, x_t, dxt_dt, t, 0.5, 1.0, 0.1)
    # w = 0 at initialisation: the loss is ||g||^2 / D exactly when F_theta - F^- is zero in value.
    torch.testing.assert_close(losses, g.pow(2).flatten(1).mean(dim=1), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tangent_c=math.inf), "tangent_c=inf"),
        (dict(weighting_channels=0), "weighting_channels=0"),
        (dict(weighting_channels=-4), "weighting_channels=-4"),
        (dict(p_mean=1e9), "p_mean=1000000000.0"),
        (dict(p_mean=math.nan), "p_mean=nan"),
        (dict(p_std="wide"), "p_std='wide'"),
        (dict(tangent_norm="l1"), "tangent_norm='l1'"),
        (dict(jvp_precision="bf16"), "jvp_precision='bf16'"),
        (dict(weighting="fourier"), "weighting='fourier'"),
    ],
)
def test_bad_sct_values_stop_with_one_line_naming_the_value(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as info:
        SCM(TrigFlow(), **kwargs)
    assert "\n" not in str(info.value)
