"""Improved MeanFlow (iMF, arXiv:2512.02012, eq. 12) against its formulas: the loss of a linear u by hand, flow
matching at r = t with the tangent u(z_t, t, t), the exact average velocity of Gaussian data as the optimum (its
loss is flow matching's irreducible variance, its gradient zero), the published settings, bad input, and
``python train.py experiment=digits_imeanflow +debug=tiny`` then ``evaluate.py`` on its checkpoint."""

import pytest
import torch
from helpers import TINY
from helpers.builders import LinearU, randomise, tiny_net
from helpers.launch import run_script
from hydra import compose, initialize_config_dir
from torch import nn

from cm_lightning.checkpoint import META_KEY
from cm_lightning.diffusion.meanflow_param import MeanFlowParam
from cm_lightning.diffusion.objectives.base import StepContext
from cm_lightning.diffusion.objectives.imeanflow import ImprovedMeanFlow
from cm_lightning.diffusion.objectives.meanflow import MeanFlow, mean_flow_target
from cm_lightning.diffusion.trigflow import TrigFlow
from cm_lightning.errors import ConfigError


def context(seed: int = 0, dropout_seed: int | None = None) -> StepContext:
    reseed = (lambda: torch.manual_seed(dropout_seed)) if dropout_seed is not None else (lambda: None)
    return StepContext(0, torch.Generator().manual_seed(seed), lambda local, fn: fn(local), reseed)


def per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1)


def sigma(t: torch.Tensor, s: float) -> torch.Tensor:
    """The standard deviation of z_t = (1 - t) x + t e for x ~ N(0, s^2), e ~ N(0, 1)."""
    return ((1 - t) ** 2 * s**2 + t**2).sqrt()


class GaussianU(nn.Module):
    """``scale`` times the exact average velocity of x ~ N(0, s^2) per pixel. Its flow keeps z / sigma_t, so
    z_r = z_t sigma_r / sigma_t and u(z, r, t) = z (sigma_t - sigma_r) / ((t - r) sigma_t); at r = t it is the
    marginal velocity v(z, t) = E[e - x | z_t] = z (t - (1 - t) s^2) / sigma_t^2."""

    def __init__(self, s: float):
        super().__init__()
        self.s = s
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, z, times, labels=None):
        t, h = times[:, 0], times[:, 1]
        apart = h > 0
        average = (sigma(t, self.s) - sigma(t - h, self.s)) / (torch.where(apart, h, 1.0) * sigma(t, self.s))
        velocity = (t - (1 - t) * self.s**2) / sigma(t, self.s) ** 2
        return self.scale * per_sample(torch.where(apart, average, velocity)) * z


def test_the_loss_is_the_hand_computed_v_loss_of_a_linear_u():
    """u = a z + b t + c (t - r): v_theta = u(z, t, t) = a z + b t, du/dt along (v_theta, 0, 1) = a v_theta + b + c,
    V = u + (t - r) du/dt, loss = ||V - (e - x)||^2 / (||.||^2 + c)^p (eq. 12). With e - x as the tangent the same
    formula is MeanFlow's loss (iMF eqs. 9-10): the two differ in the tangent alone."""
    a, b, c = 0.3, -1.2, 0.7
    net, x0 = LinearU(a, b, c), torch.randn(6, 1, 4, 4)
    for objective, imf in ((ImprovedMeanFlow(MeanFlowParam(), norm_p=0.5), True), (MeanFlow(MeanFlowParam()), False)):
        losses, extra = objective.loss(net, None, x0, None, context())
        t, r, e, _ = objective.draws(x0, context())
        z, v = (1 - per_sample(t)) * x0 + per_sample(t) * e, e - x0
        u = a * z + b * per_sample(t) + c * per_sample(t - r)
        tangent = a * z + b * per_sample(t) if imf else v
        V = u + per_sample(t - r) * (a * tangent + b + c)
        squared = (V - v).pow(2).flatten(1).sum(dim=1)
        torch.testing.assert_close(losses, squared / (squared + objective.norm_c) ** objective.norm_p)
        torch.testing.assert_close(extra["squared_error"], squared.mean())
        assert 0 < extra["r_ne_t"] < 1


def test_r_equal_t_is_flow_matching_and_the_tangent_is_u_at_r_equal_t():
    """The tangent is the JVP's own function at r = t (same dropout masks, no graph); at r = t the target is v
    and the loss flow matching's ||u(z_t, t, t) - (e - x)||^2."""
    torch.manual_seed(0)
    net, parameterisation = randomise(tiny_net(dropout=0.3, num_times=2)), MeanFlowParam()
    objective = ImprovedMeanFlow(parameterisation, fraction=0.0, norm_p=0.0)
    z, v, t = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8), torch.tensor([0.2, 0.5, 0.9])
    u_fn = lambda z, r, t: parameterisation.u(net, z, r, t)  # noqa: E731
    tangent = objective.tangent(u_fn, z, t, v, context(dropout_seed=7))
    torch.manual_seed(7)
    assert torch.equal(tangent, u_fn(z, t, t)) and not tangent.requires_grad
    _, target = mean_flow_target(u_fn, z, t, t, v, tangent)
    assert torch.equal(target, v)

    net.eval()
    x0 = torch.randn(4, 1, 8, 8).clamp(-1, 1)
    losses, extra = objective.loss(net, None, x0, None, context())
    t, r, e, _ = objective.draws(x0, context())
    assert torch.equal(r, t) and extra["r_ne_t"] == 0
    z = (1 - per_sample(t)) * x0 + per_sample(t) * e
    flow_matching = (net(z, torch.stack([t, 0 * t], dim=1)) - (e - x0)).pow(2).flatten(1).sum(dim=1)
    torch.testing.assert_close(losses, flow_matching, rtol=1e-6, atol=0)


def test_the_exact_average_velocity_of_gaussian_data_is_the_optimum():
    """For x ~ N(0, s^2) the exact u makes V the marginal velocity v(z_t) at any r (the MeanFlow identity), so
    each loss is ||v(z_t) - (e - x)||^2, whose mean given t is D s^2 / sigma_t^2, flow matching's irreducible
    variance, and the gradient at the optimum vanishes (E[e - x | z_t] = v(z_t)); away from it, it does not.
    MeanFlow's loss at the same optimum is smaller than that variance: its prediction depends on e - x."""
    s, torch_gen = 0.5, torch.Generator().manual_seed(1)
    x0 = s * torch.randn(4096, 1, 4, 4, generator=torch_gen)
    net, objective = GaussianU(s), ImprovedMeanFlow(MeanFlowParam(), p_mean=0.0, p_std=1.0, norm_p=0.0)
    losses, _ = objective.loss(net, None, x0, None, context(3))
    t, r, e, _ = objective.draws(x0, context(3))
    z = (1 - per_sample(t)) * x0 + per_sample(t) * e
    marginal = per_sample((t - (1 - t) * s**2) / sigma(t, s) ** 2) * z
    torch.testing.assert_close(losses, (marginal - (e - x0)).pow(2).flatten(1).sum(dim=1), rtol=1e-4, atol=1e-5)
    irreducible = 16 * s**2 / sigma(t, s) ** 2
    assert (losses / irreducible).mean().item() == pytest.approx(1.0, abs=0.03)
    assert (r < t).float().mean().item() == pytest.approx(0.5, abs=0.03)
    # MeanFlow's prediction sees e - x: V = v + (1 - sigma_r / sigma_t)(e - x - v), so at the same optimum its
    # loss is (sigma_r / sigma_t)^2 times iMF's, sample by sample, below the irreducible variance where r < t.
    meanflow = MeanFlow(MeanFlowParam(), p_mean=0.0, p_std=1.0, fraction=0.5, norm_p=0.0)
    ratio = per_sample(sigma(r, s) / sigma(t, s)).flatten() ** 2
    torch.testing.assert_close(meanflow.loss(net, None, x0, None, context(3))[0], ratio * losses, rtol=1e-4, atol=1e-5)

    def gradient(scale: float) -> float:
        net.scale.data.fill_(scale)
        net.scale.grad = None
        objective.loss(net, None, x0, None, context(3))[0].mean().backward()
        return net.scale.grad.item()

    assert abs(gradient(1.0)) < 0.1 * abs(gradient(1.2))


def test_published_values():
    """model=imeanflow carries iMF's ImageNet values (configs/default.py); the ImageNet-256 experiment is
    MeanFlow B/2's settings with iMF's objective (the ablation row, FID 5.97)."""
    from helpers import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        model = compose("train", overrides=["~experiment", "model=imeanflow"]).model.objective
        b2 = compose("train", overrides=["experiment=imagenet256_imeanflow_b2"], return_hydra_config=True)
    assert model._target_.endswith("imeanflow.ImprovedMeanFlow")
    assert (model.p_mean, model.p_std, model.fraction, model.norm_p, model.norm_c) == (-0.4, 1.0, 0.5, 1.0, 0.01)
    assert b2.model.objective._target_ == model._target_ and b2.hydra.runtime.choices.net == "dit_b_2"
    assert (b2.data.batch_size, b2.model.optimizer.lr, list(b2.model.optimizer.betas)) == (256, 1e-4, [0.9, 0.95])
    assert (b2.model.objective.omega, b2.model.objective.kappa, b2.model.objective.fraction) == (1.0, 0.5, 0.25)
    assert b2.trainer.max_steps == 240 * 5005 and b2.net.num_times == 2 and b2.net.null_class


def test_bad_settings_stop_with_one_line():
    for options, message in (
        (dict(fraction=1.5), "model.objective.fraction=1.5"),
        (dict(norm_c=0.0), "model.objective.norm_c=0.0"),
        (dict(fraction="half"), "model.objective.fraction"),
    ):
        with pytest.raises(ConfigError, match=message):
            ImprovedMeanFlow(MeanFlowParam(), **options)
    with pytest.raises(ConfigError, match="parameterisation=meanflow"):
        ImprovedMeanFlow(TrigFlow())
    with pytest.raises(ConfigError, match="net.num_times=1"):
        ImprovedMeanFlow(MeanFlowParam()).check(tiny_net())


def test_digits_imeanflow_trains_and_evaluate_samples_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    run_script(
        "train.py",
        "experiment=digits_imeanflow",
        *TINY,
        "trainer.accelerator=cpu",
        "logger=csv",
        "callbacks.metrics.every_n_steps=null",
        "callbacks.metrics.at_end=false",
        f"hydra.run.dir={run}",
    )
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    assert ckpt[META_KEY]["config"]["model"]["objective"]["_target_"].endswith("imeanflow.ImprovedMeanFlow")
    assert all(torch.isfinite(v).all() for k, v in ckpt["state_dict"].items() if k.startswith("net."))
    ckpt_path, out = run / "checkpoints" / "last.ckpt", tmp_path / "eval"
    run_script("evaluate.py", f"ckpt={ckpt_path}", "num=8", f"hydra.run.dir={out}")
    assert {p.name for p in out.glob("samples_*step.png")} == {"samples_1step.png", "samples_2step.png"}
