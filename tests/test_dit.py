"""DiT (nets/dit.py): the official layout of DiT-B/2 and XL/2 key for key, adaLN-Zero's identity blocks at
initialisation, the fixed 2D sin-cos embedding against its formula, and the two-time conditioning MeanFlow uses."""

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cm_lightning.errors import ConfigError
from cm_lightning.nets.dit import DiT

DATA = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parents[1]
LAYOUT = json.loads((DATA / "dit-state-dict-layout.json").read_text())
PRESETS = {"DiT-B/2": "dit_b_2", "DiT-XL/2": "dit_xl_2"}


def tiny_dit(**kwargs) -> DiT:
    torch.manual_seed(0)
    args = dict(image_size=8, in_channels=2, patch_size=2, hidden_size=32, depth=2, num_heads=4) | kwargs
    return DiT(**args)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_have_the_official_state_dict(name):
    """The net config with DiT's released options (1,000 classes and the "no class" row, 2C outputs) builds the
    official keys in the official order, with their shapes and parameter count; built on the meta device."""
    cfg = OmegaConf.load(ROOT / "conf" / "net" / f"{PRESETS[name]}.yaml")
    cfg.merge_with({"image_size": 32, "in_channels": 4, "num_classes": 1000, "null_class": True, "learn_sigma": True})
    with torch.device("meta"):
        net = instantiate(cfg)
    expected = LAYOUT[name]
    assert [(k, list(v.shape)) for k, v in net.state_dict().items()] == [
        (k, v) for k, v in expected["state_dict"].items()
    ]
    assert sum(p.numel() for p in net.parameters()) == expected["num_params"]
    assert not net.pos_embed.requires_grad


def test_fresh_blocks_are_the_identity_and_the_output_zero():
    """adaLN-Zero (DiT, Section 3.2): every gate regresses from zero weights, so each block returns its input,
    and the zeroed output layer makes the whole net return zeros."""
    net = tiny_dit(num_classes=3)
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in net.blocks:
        torch.testing.assert_close(block(h, c), h, rtol=0, atol=0)
    x = torch.randn(2, 2, 8, 8)
    assert torch.equal(net(x, torch.rand(2), torch.tensor([0, 2])), torch.zeros_like(x))


def test_positional_embedding_is_the_2d_sincos_formula():
    """Token (row i, column j), channel k < D/4: sin(j w_k); D/4 + k: cos(j w_k); then the same of i, with
    w_k = 10000^(-k / (D/4)) (DiT's get_2d_sincos_pos_embed, whose first half encodes the column)."""
    net, d = tiny_dit(), 32
    pos = net.pos_embed[0].double()
    quarter = d // 4
    for token, (i, j) in enumerate((i, j) for i in range(4) for j in range(4)):
        for k in range(quarter):
            w = 10000 ** (-k / quarter)
            expected = [math.sin(j * w), math.cos(j * w), math.sin(i * w), math.cos(i * w)]
            got = [pos[token, k + q * quarter].item() for q in range(4)]
            assert got == pytest.approx(expected, abs=1e-6)


def test_patchify_and_unpatchify_are_inverse():
    """The output layer's token t, feature (a, b, c) lands at pixel (p row + a, p col + b) of channel c."""
    net = tiny_dit()
    tokens = torch.arange(16 * 2 * 2 * 2, dtype=torch.float32).reshape(1, 16, 8)
    image = net.unpatchify(tokens)
    row, col, a, b, c = 1, 3, 1, 0, 1
    assert image[0, c, 2 * row + a, 2 * col + b] == tokens[0, 4 * row + col, (a * 2 + b) * 2 + c]


def test_two_times_each_have_an_embedder_summed():
    """num_times=2: the conditioning is t_embedder(t) + h_embedder(t - r): t - r alone changes the output, and
    with the h-embedder's last layer zeroed (its output a constant 0) it no longer does."""
    net = tiny_dit(num_times=2)
    for p in net.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.2)
    x = torch.randn(1, 2, 8, 8).expand(2, -1, -1, -1)
    t = torch.tensor([[0.5, 0.0], [0.5, 0.3]])
    out = net(x, t)
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    for p in net.h_embedder.mlp[2].parameters():
        p.data.zero_()
    out = net(x, t)
    torch.testing.assert_close(out[0], out[1])


def test_bad_net_settings_stop_with_one_line():
    with pytest.raises(ConfigError, match="net.patch_size=3 does not divide the resolution 8"):
        tiny_dit(patch_size=3)
    with pytest.raises(ConfigError, match="null_class=true"):
        tiny_dit(null_class=True)


def attention_dit(dtype=torch.float32) -> DiT:
    """A tiny DiT with every weight drawn (not adaLN-Zero's zeros), so attention and the modulation matter."""
    net = tiny_dit(num_times=2).to(dtype)
    for p in net.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    return net


def test_both_jvp_modes_equal_a_float64_central_difference_through_attention():
    """MeanFlow's du/dt through a DiT: torch.func's JVP and jvp=finite_difference (step 1e-5 in float64) both
    equal the central difference of u(z + h v, r, t + h) taken here; in fp32 at the default step the two modes
    agree to the finite difference's O(h^2 + eps / h)."""
    from cm_lightning.diffusion.jvp import jvp
    from cm_lightning.diffusion.meanflow_param import MeanFlowParam
    from cm_lightning.diffusion.objectives.meanflow import mean_flow_target

    parameterisation = MeanFlowParam()
    z, v = torch.randn(2, 2, 8, 8, dtype=torch.float64), torch.randn(2, 2, 8, 8, dtype=torch.float64)
    t, r = torch.tensor([0.9, 0.6], dtype=torch.float64), torch.tensor([0.2, 0.6], dtype=torch.float64)
    net = attention_dit(torch.float64)
    u = lambda z, r, t: parameterisation.u(net, z, r, t)  # noqa: E731
    h = 1e-5
    reference = (u(z + h * v, r, t + h) - u(z - h * v, r, t - h)) / (2 * h)
    tangents = (v, torch.zeros_like(r), torch.ones_like(t))
    for mode in ("autograd", "finite_difference"):
        out, du_dt = jvp(u, (z, r, t), tangents, mode=mode, step=h)
        torch.testing.assert_close(out, u(z, r, t), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(du_dt, reference, rtol=0, atol=1e-8)

    net32 = attention_dit()
    u32 = lambda z, r, t: parameterisation.u(net32, z, r, t)  # noqa: E731
    args = z.float(), r.float(), t.float(), v.float()
    _, autograd_target = mean_flow_target(u32, *args)
    _, fd_target = mean_flow_target(u32, *args, mode="finite_difference")
    scale = autograd_target.abs().max()
    torch.testing.assert_close(fd_target / scale, autograd_target / scale, rtol=0, atol=2e-4)


def test_finite_difference_draws_one_dropout_mask_for_all_its_evaluations():
    """fn(x) = dropout(x^2): with one mask m in all three evaluations the derivative along v is 2 fn(x) v / x."""
    from cm_lightning.diffusion.jvp import jvp

    x, v = torch.rand(64, dtype=torch.float64) + 0.5, torch.randn(64, dtype=torch.float64)
    torch.manual_seed(1)
    out, d = jvp(lambda x: torch.nn.functional.dropout(x**2, 0.5), (x,), (v,), mode="finite_difference", step=1e-5)
    assert 0 < (out == 0).sum() < 64
    torch.testing.assert_close(d, 2 * out * v / x)


def test_a_kernel_without_forward_mode_ad_names_the_finite_difference():
    """The fused CPU flash-attention op has no forward-mode AD: jvp=autograd stops with one line naming
    jvp=finite_difference, which then equals the float64 central difference of the math kernel."""
    from cm_lightning.diffusion.jvp import jvp

    q = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    dq = torch.randn_like(q)
    flash = lambda q: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)[0]  # noqa: E731
    with pytest.raises(ConfigError, match="set model.objective.jvp=finite_difference"):
        jvp(flash, (q,), (q,))
    _, fd = jvp(flash, (q,), (dq,), mode="finite_difference", step=1e-6)
    math_kernel = torch.nn.functional.scaled_dot_product_attention
    _, exact = jvp(lambda q: math_kernel(q, q, q), (q,), (dq,))
    torch.testing.assert_close(fd, exact, rtol=1e-6, atol=1e-8)


def test_bad_jvp_settings_stop_with_one_line():
    from cm_lightning.diffusion.meanflow_param import MeanFlowParam
    from cm_lightning.diffusion.objectives.meanflow import MeanFlow
    from cm_lightning.diffusion.objectives.scm import SCM
    from cm_lightning.diffusion.trigflow import TrigFlow

    with pytest.raises(ConfigError, match="model.objective.jvp='forward' is unknown"):
        MeanFlow(MeanFlowParam(), jvp="forward")
    with pytest.raises(ConfigError, match="model.objective.jvp_step=0"):
        SCM(TrigFlow(), jvp="finite_difference", jvp_step=0)


class LinearField(torch.nn.Module):
    """u(z, r, t) = a z + b (t - r) + c t, fed (t, t - r) like a MeanFlow net."""

    in_channels, image_size, num_classes, num_times = 1, 4, 0, 2

    def __init__(self, a: float, b: float = 0.0, c: float = 0.0):
        super().__init__()
        self.a, self.b, self.c = a, b, c

    def forward(self, z, noise_labels, class_labels=None):
        t, h = noise_labels[:, 0].view(-1, 1, 1, 1), noise_labels[:, 1].view(-1, 1, 1, 1)
        return self.a * z + self.b * h + self.c * t


def start_noise(num: int, seed: int) -> torch.Tensor:
    return torch.randn((num, 1, 4, 4), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_flow_map_sampler_lands_where_the_closed_form_says(steps):
    """With u = a z + b (t - r) + c t each jump is z_r = z_t - (t - r)(a z_t + b (t - r) + c t), from z_1 = e
    through the even levels 1, (k-1)/k, ..., 1/k to 0: the default sampler of MeanFlow lands on that product."""
    from cm_lightning.diffusion.meanflow_param import MeanFlowParam
    from cm_lightning.sampler import Sampler

    a, b, c = 0.7, 0.3, -0.2
    x, _ = Sampler(LinearField(a, b, c), MeanFlowParam())(8, steps=steps, seed=3)
    z = start_noise(8, 3).double()
    levels = [(steps - i) / steps for i in range(steps)] + [0.0]
    for t, r in zip(levels, levels[1:]):
        z = z - (t - r) * (a * z + b * (t - r) + c * t)
    torch.testing.assert_close(x.double(), z.clamp(-1, 1), rtol=1e-5, atol=1e-6)


def test_flow_map_is_exact_for_a_point_mass_and_renoise_stays_an_option():
    """Data at x0 alone: the true average velocity is u = (z - x0) / t, and every jump count lands on x0. The
    re-noising chain stays available (a plan ``2step_renoise`` and ``chain=renoise``) and is another sampler."""
    from cm_lightning.checkpoint import from_meta
    from cm_lightning.diffusion.meanflow_param import MeanFlowParam
    from cm_lightning.sampler import Sampler

    x0 = 0.25

    class PointMass(LinearField):
        def forward(self, z, noise_labels, class_labels=None):
            return (z - x0) / noise_labels[:, 0].view(-1, 1, 1, 1)

    sampler = Sampler(PointMass(0.0), MeanFlowParam())
    for steps in (1, 2, 3):
        x, _ = sampler(4, steps=steps)
        torch.testing.assert_close(x, torch.full_like(x, x0))
    assert sampler.plans([1, 2])["2step_renoise"] == dict(steps=2, chain="renoise")
    linear = Sampler(LinearField(0.5), MeanFlowParam())
    jumps, renoised = linear(4, steps=2)[0], linear(4, steps=2, chain="renoise")[0]
    assert not torch.allclose(jumps, renoised)
    # A checkpoint written before the option has no ``chain``: it samples with MeanFlow's jumps.
    old = {"parameterisation": {"name": "meanflow", "time_scale": 1.0, "sigma_min": 0.002, "sigma_max": 80.0}}
    assert from_meta(old).chain == "flow_map"


def test_bad_sampler_chains_stop_with_one_line():
    from cm_lightning.diffusion.meanflow_param import MeanFlowParam
    from cm_lightning.diffusion.objectives.meanflow import MeanFlow
    from cm_lightning.diffusion.precond import consistency_function
    from cm_lightning.sampler import Sampler

    with pytest.raises(ConfigError, match="parameterisation.chain='jump' is unknown"):
        MeanFlow(MeanFlowParam(chain="jump"))
    with pytest.raises(ConfigError, match="chain='flow_map'"):
        Sampler(LinearField(0.5), consistency_function())(2, chain="flow_map")


def test_guidance_stops_above_the_guidance_interval():
    """guidance_t_max = 0.75 (FastGen's DiT-XL): at t = 0.5 the target velocity is the folded v_g, at t = 0.9
    the plain v with the label kept."""
    from cm_lightning.diffusion.meanflow_param import MeanFlowParam
    from cm_lightning.diffusion.objectives.meanflow import MeanFlow

    net = tiny_dit(num_times=2, num_classes=3, null_class=True)
    for p in net.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    objective = MeanFlow(MeanFlowParam(), omega=0.2, kappa=0.92, label_dropout=0.1, guidance_t_max=0.75)
    z, v = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    t, labels = torch.tensor([0.5, 0.9]), torch.tensor([1, 2])
    target, used = objective.guided_velocity(net, z, t, v, labels, torch.tensor([False, False]))
    assert torch.equal(used, labels) and torch.equal(target[1], v[1])
    u = lambda y: MeanFlowParam().u(net.eval(), z[:1], t[:1], t[:1], torch.tensor([y]))[0]  # noqa: E731
    torch.testing.assert_close(target[0], 0.2 * v[0] + 0.92 * u(1) + (1 - 0.2 - 0.92) * u(3))
    with pytest.raises(ConfigError, match="guidance_t_max=0"):
        MeanFlow(MeanFlowParam(), guidance_t_max=0)


# conf/debug/tiny.yaml shrinks the U-Nets by their own keys; a DiT has none of them and is shrunk by its own.
DIT_TINY = [
    "+debug=tiny",
    *(f"~net.{key}" for key in ("model_channels", "channel_mult", "num_head_channels")),
    "net.hidden_size=32",
    "net.depth=2",
    "net.num_heads=2",
]
MEANFLOW_DIT = [
    "experiment=digits_meanflow_dit",
    *DIT_TINY,
    "trainer.accelerator=cpu",
    "trainer.deterministic=true",
    "logger=csv",
    "callbacks.metrics.every_n_steps=null",
    "callbacks.metrics.at_end=false",
]


def test_a_tiny_dit_meanflow_run_trains_and_samples_with_both_chains(tmp_path):
    """python train.py experiment=digits_meanflow_dit for a few steps: a finite DiT with its h-embedder, and sample
    grids of the flow map (1 and 2 steps) and of the re-noising chain (2 steps)."""
    from helpers.launch import run_script

    run_script("train.py", *MEANFLOW_DIT, "model.objective.jvp=finite_difference", f"hydra.run.dir={tmp_path}")
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and "net.h_embedder.mlp.0.weight" in ckpt["state_dict"]
    assert all(torch.isfinite(v).all() for k, v in ckpt["state_dict"].items() if k.startswith("net."))
    assert {p.name for p in (tmp_path / "samples").glob("final_*.png")} == {
        "final_1step.png",
        "final_2step.png",
        "final_2step_renoise.png",
    }


def test_bad_dit_settings_stop_before_any_step_with_one_line(tmp_path):
    """Through train.py for a patch size that does not divide the resolution; a one-time DiT and guidance on an
    unconditional DiT stop in MeanFlow's check, which the module runs when the run is built."""
    from helpers.launch import fails

    from cm_lightning.diffusion.meanflow_param import MeanFlowParam
    from cm_lightning.diffusion.objectives.meanflow import MeanFlow

    tiny = ["experiment=digits_meanflow_dit", *DIT_TINY, "logger=none", f"hydra.run.dir={tmp_path}"]
    err = fails("train.py", *tiny, "net.patch_size=3")
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "net.patch_size=3 does not divide the resolution 16" in line, err[-2000:]
    with pytest.raises(ConfigError, match="net.num_times=1: MeanFlow's network takes two times"):
        MeanFlow(MeanFlowParam()).check(tiny_dit())
    with pytest.raises(ConfigError, match="net.null_class=true"):
        MeanFlow(MeanFlowParam(), kappa=0.5).check(tiny_dit(num_times=2))


@pytest.mark.slow
def test_two_ranks_take_the_single_process_dit_meanflow_step(tmp_path):
    from helpers.scenarios import two_ranks_and_one

    ddp, _ = two_ranks_and_one(MEANFLOW_DIT, tmp_path)
    assert any(k.startswith("net.h_embedder.") for k in ddp)


@pytest.mark.slow
def test_dit_meanflow_resumes_bit_for_bit(tmp_path):
    from helpers.scenarios import killed_and_resumed

    killed_and_resumed([*MEANFLOW_DIT, "model.objective.jvp=finite_difference"], tmp_path)
