"""MeanFlow and its parameterisation against their formulas: the JVP's total derivative, the target of an
analytic u, flow matching at r = t, the (t, r) sampler, the folded guidance, the two-time nets and bad input."""

import pytest
import torch
from helpers.builders import LinearU, randomise, tiny_net

from cm_lightning.checkpoint import from_meta
from cm_lightning.diffusion.meanflow_param import MeanFlowParam
from cm_lightning.diffusion.objectives.base import StepContext
from cm_lightning.diffusion.objectives.meanflow import MeanFlow, mean_flow_target
from cm_lightning.diffusion.trigflow import TrigFlow
from cm_lightning.errors import ConfigError
from cm_lightning.modules.generative import GenerativeModule
from cm_lightning.nets.adm import ADMUNet
from cm_lightning.nets.ncsnpp import NCSNpp


def two_time_net(num_classes: int = 0, null_class: bool = False) -> ADMUNet:
    return tiny_net(num_classes=num_classes, num_times=2, null_class=null_class)


def context(seed: int = 0) -> StepContext:
    return StepContext(0, torch.Generator().manual_seed(seed), lambda local, fn: fn(local), lambda: None)


def test_one_step_is_z1_minus_u_and_the_noising_matches_edm():
    parameterisation = MeanFlowParam()
    net = randomise(two_time_net())
    z = torch.randn(3, 1, 8, 8)
    ones = torch.ones(3)
    u = net(z, torch.stack([ones, ones], dim=1))
    torch.testing.assert_close(parameterisation(net, z, ones), z - u)
    assert torch.equal(parameterisation(net, z, torch.zeros(3)), z)  # f(z, 0) = z
    x0, e = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.5, 3.0], dtype=torch.float64)
    t = sigma / (1 + sigma)
    assert parameterisation.from_sigma(3.0) == pytest.approx(0.75)
    torch.testing.assert_close(
        parameterisation.from_edm(x0 + sigma.view(-1, 1, 1, 1) * e, t), parameterisation.add_noise(x0, e, t)
    )
    assert parameterisation.levels(1) == [1.0] and parameterisation.levels(2) == [1.0, 0.5]
    scaled = MeanFlowParam(time_scale=1000.0)
    assert from_meta({"parameterisation": scaled.to_meta()}) == scaled


def test_jvp_equals_a_central_finite_difference_in_float64():
    torch.manual_seed(0)
    net = randomise(two_time_net(), std=0.2).double().eval()  # attention at 4x4 inside
    parameterisation = MeanFlowParam()
    z, v = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    t, r = torch.tensor([0.7, 0.9], dtype=torch.float64), torch.tensor([0.2, 0.9], dtype=torch.float64)
    u_fn = lambda z, r, t: parameterisation.u(net, z, r, t)  # noqa: E731
    u, target = mean_flow_target(u_fn, z, r, t, v)
    h = 1e-6
    with torch.no_grad():
        fd = (u_fn(z + h * v, r, t + h) - u_fn(z - h * v, r, t - h)) / (2 * h)
    du_dt = (v - target) / (t - r).clamp_min(1e-12).view(-1, 1, 1, 1)
    assert target.requires_grad is False
    torch.testing.assert_close(target[1], v[1])  # r = t: the target is v
    assert (du_dt[0] - fd[0]).norm() / fd[0].norm() < 1e-6


def test_the_target_of_a_linear_u_is_the_hand_computed_value():
    """u = a z + b t + c (t - r): du/dt along (v, 0, 1) = a v + b + c, so u_tgt = v - (t - r)(a v + b + c)."""
    a, b, c = 0.3, -1.2, 0.7
    net, parameterisation = LinearU(a, b, c).double(), MeanFlowParam()
    z, v = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t, r = torch.tensor([0.9, 0.5, 0.4], dtype=torch.float64), torch.tensor([0.1, 0.5, 0.0], dtype=torch.float64)
    u, target = mean_flow_target(lambda z, r, t: parameterisation.u(net, z, r, t), z, r, t, v)
    gap = (t - r).view(-1, 1, 1, 1)
    torch.testing.assert_close(u, a * z + b * t.view(-1, 1, 1, 1) + c * gap)
    torch.testing.assert_close(target, v - gap * (a * v + b + c))


def test_r_equal_t_gives_the_flow_matching_loss_exactly():
    torch.manual_seed(0)
    net = randomise(two_time_net())
    objective = MeanFlow(MeanFlowParam(), fraction=0.0, norm_p=0.0)
    x0 = torch.randn(4, 1, 8, 8).clamp(-1, 1)
    losses, extra = objective.loss(net, None, x0, None, context())
    t, r, e, _ = objective.draws(x0, context())
    assert torch.equal(r, t) and extra["r_ne_t"] == 0
    z = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * e
    flow_matching = (net(z, torch.stack([t, 0 * t], dim=1)) - (e - x0)).pow(2).flatten(1).sum(dim=1)
    torch.testing.assert_close(losses, flow_matching, rtol=1e-6, atol=0)


def test_times_follow_the_published_sampler():
    objective = MeanFlow(MeanFlowParam(), p_mean=-0.4, p_std=1.0, fraction=0.25)
    t, r, _, dropped = objective.draws(torch.zeros(20000, 1, 1, 1), context())
    assert (t >= r).all() and (t <= 1).all() and (r >= 0).all() and not dropped.any()
    assert (r != t).float().mean().item() == pytest.approx(0.25, abs=0.01)
    # the larger of two logit-normal(-0.4, 1) draws: P(t < 0.5) = Phi(0.4)^2
    assert (t < 0.5).float().mean().item() == pytest.approx(0.6554**2, abs=0.01)


def test_adaptive_weight_and_gradients():
    torch.manual_seed(0)
    module = GenerativeModule(
        randomise(two_time_net()),
        MeanFlow(MeanFlowParam(), norm_p=1.0, norm_c=1e-3),
        optimizer=lambda params: torch.optim.Adam(params),
    )
    x0 = torch.randn(4, 1, 8, 8).clamp(-1, 1)
    losses, extra = module.losses(x0, None, 0)
    # p = 1: loss = ||delta||^2 / (||delta||^2 + c) < 1 in value, with the gradient of ||delta||^2 / sg(.)
    assert losses.shape == (4,) and (losses < 1).all() and (losses > 0.5).all()
    losses.mean().backward()
    assert all(p.grad is not None for p in module.net.parameters() if p.requires_grad)


def test_guidance_folds_the_unconditional_and_conditional_velocities():
    """v_g = omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | none); dropped labels keep v."""
    torch.manual_seed(0)
    net = randomise(two_time_net(num_classes=3, null_class=True)).eval()
    objective = MeanFlow(MeanFlowParam(), omega=0.5, kappa=0.25, label_dropout=0.1)
    objective.check(net)
    z, v = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t, labels = torch.tensor([0.2, 0.4, 0.6, 0.8]), torch.tensor([0, 1, 2, 1])
    dropped = torch.tensor([False, True, False, False])
    v_g, used = objective.guided_velocity(net, z, t, v, labels, dropped)
    u = lambda y: net(z, torch.stack([t, 0 * t], dim=1), y)  # noqa: E731
    expected = 0.5 * v + 0.25 * u(labels) + 0.25 * u(torch.full_like(labels, 3))
    torch.testing.assert_close(v_g[[0, 2, 3]], expected[[0, 2, 3]])
    assert torch.equal(v_g[1], v[1]) and used.tolist() == [0, 3, 2, 1]


def test_one_time_nets_keep_their_layout_and_two_time_nets_take_two_times():
    """One time: the modules and shapes of before (the authors' checkpoints load, tests/test_authors_checkpoints.py).
    Two: ADM adds a second time MLP (summed, as the official DiT), NCSN++ widens its first mapping layer
    (concatenated, as the official DDPM++)."""
    common = dict(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2), attention_resolutions=(4,))
    for kind, extra in ((ADMUNet, dict(num_head_channels=16)), (NCSNpp, {})):
        one, two = kind(**common, **extra), kind(**common, **extra, num_times=2)
        shapes_one = {k: v.shape for k, v in one.state_dict().items()}
        shapes_two = {k: v.shape for k, v in two.state_dict().items() if not k.startswith("time_embed2.")}
        changed = {k for k in shapes_one if shapes_one[k] != shapes_two[k]}
        assert shapes_one.keys() == shapes_two.keys()
        assert changed == (set() if kind is ADMUNet else {"map_layer0.weight"})
        x = torch.randn(2, 1, 8, 8)
        assert two(x, torch.rand(2, 2)).shape == x.shape and one(x, torch.rand(2)).shape == x.shape
        with pytest.raises(ValueError, match="net.num_times"):
            two(x, torch.rand(2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(norm_p=-0.5), "norm_p=-0.5"),
        (dict(norm_c=0.0), "norm_c=0.0"),
        (dict(fraction=1.5), "fraction=1.5"),
        (dict(fraction=-0.1), "fraction=-0.1"),
        (dict(p_std=0.0), "p_std=0.0"),
        (dict(label_dropout=1.0), "label_dropout=1.0"),
    ],
)
def test_bad_meanflow_settings_stop_with_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MeanFlow(MeanFlowParam(), **kwargs)


def test_a_one_time_net_or_a_guided_net_without_a_null_class_stops_with_one_line():
    with pytest.raises(ConfigError, match="net.num_times=1"):
        MeanFlow(MeanFlowParam()).check(
            randomise(
                ADMUNet(
                    image_size=8,
                    in_channels=1,
                    model_channels=16,
                    channel_mult=(1, 2),
                    attention_resolutions=(4,),
                    num_head_channels=16,
                )
            )
        )
    with pytest.raises(ConfigError, match="null_class=true"):
        MeanFlow(MeanFlowParam(), omega=2.0).check(two_time_net(num_classes=3))
    with pytest.raises(ConfigError, match="parameterisation=meanflow"):
        MeanFlow(TrigFlow())
