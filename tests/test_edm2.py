"""The EDM2 U-Net against the official layouts and its magnitude-preserving design, the EDM2 teacher objective and
the power-function EMA against their formulas, and a tiny EDM2 teacher from the command line."""

import functools
import json
import math
from pathlib import Path

import hydra.utils
import pytest
import torch
from helpers import ROOT
from helpers.builders import cpu_trainer, tiny_net
from helpers.launch import run_script, train_here
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, TensorDataset

from cm_lightning.diffusion.jvp import jvp
from cm_lightning.diffusion.objectives.edm2 import EDM2Denoising
from cm_lightning.diffusion.precond import edm_denoiser
from cm_lightning.errors import ConfigError
from cm_lightning.loading import load_matching, sampler_from_checkpoint
from cm_lightning.modules import posthoc_ema
from cm_lightning.modules.ema import gamma_to_std, posthoc_coefficients, power_beta, std_to_gamma
from cm_lightning.modules.generative import GenerativeModule
from cm_lightning.nets.edm2 import EDM2UNet
from cm_lightning.nets.magnitude_preserving import MPConv, MPFourier, MPPositional, mp_cat, mp_silu, mp_sum, normalize
from cm_lightning.untrusted import load_file

LAYOUT = json.loads((Path(__file__).parent / "data" / "edm2-state-dict-layout.json").read_text())
PRESETS = {"xs": 128, "s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}


def preset(name: str) -> tuple[EDM2UNet, EDM2Denoising]:
    """The ImageNet-512 preset's net and teacher objective, on the meta device (no memory for the weights)."""
    with torch.device("meta"):
        return EDM2UNet(64, 4, 1000, PRESETS[name]), EDM2Denoising(edm_denoiser(noise_kind="edm"))


def official_state(net: EDM2UNet, objective: EDM2Denoising) -> dict:
    """The state dict as the official Precond names it: the U-Net under ``unet.``, the uncertainty head beside it."""
    return {**{f"unet.{k}": v for k, v in net.state_dict().items()}, **objective.state_dict()}


def tiny_edm2(gain: float = 0.0, **options) -> EDM2UNet:
    """8x8x1 with attention; ``gain`` != 0: the embedding and output gains (zero at initialisation) set, so that
    every layer takes part in the output."""
    net = EDM2UNet(8, 1, 0, 16, (1, 2), 1, (4,), 16, **options)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(gain)
    return net


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_has_the_official_state_dict(name):
    expected = LAYOUT[f"edm2-img512-{name}"]
    state = official_state(*preset(name))
    assert sum(v.numel() for k, v in state.items() if not k.endswith(("freqs", "phases"))) == expected["num_params"]
    assert len(state) == expected["num_tensors"]
    if expected["state_dict"] is not None:  # the layout file lists every key of S and XXL
        assert {k: list(v.shape) for k, v in state.items()} == expected["state_dict"]
        assert list(state) == list(expected["state_dict"])  # the official order too


def test_weights_of_another_size_stop_with_the_mismatch():
    net, _ = preset("xs")
    layout = LAYOUT["edm2-img512-s"]["state_dict"]
    weights = {k[len("unet.") :]: torch.empty(v, device="meta") for k, v in layout.items() if k.startswith("unet.")}
    with pytest.raises(
        ConfigError, match=r"does not match the configured network: emb_fourier.freqs: expected \(128,\)"
    ):
        load_matching(net, weights, "edm2-img512-s.pkl", "use net=edm2_s")


def test_magnitude_preserving_layers_keep_unit_rms():
    torch.manual_seed(0)
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    a, b = torch.randn(64, 256, 8, 8), torch.randn(64, 256, 8, 8)
    assert rms(mp_silu(a)) == pytest.approx(1.0, abs=0.02)
    assert rms(mp_sum(a, b, t=0.3)) == pytest.approx(1.0, abs=0.01)
    assert rms(mp_cat(a, b[:, :64], t=0.7)) == pytest.approx(1.0, abs=0.01)
    assert rms(normalize(3 * a, dim=1)) == pytest.approx(1.0, abs=1e-3)  # pixel norm
    conv, linear = MPConv(256, 128, (3, 3)), MPConv(256, 512, ())
    assert rms(conv(a)[..., 1:-1, 1:-1]) == pytest.approx(1.0, abs=0.01)  # inside: no zero padding in the window
    assert rms(linear(torch.randn(4096, 256))) == pytest.approx(1.0, abs=0.01)
    t = torch.rand(4096) * 1.5
    assert rms(MPFourier(256)(t)) == pytest.approx(1.0, abs=0.02)
    assert rms(MPPositional(256)(t)) == pytest.approx(1.0, abs=1e-6)  # cos^2 + sin^2 = 1 per pair


def test_forced_weight_normalisation_keeps_unit_norm_weights_after_a_step():
    torch.manual_seed(0)
    net = tiny_edm2(gain=1.0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, MPConv):
                m.weight.mul_(5.0)  # far from unit norm
    opt = torch.optim.SGD(net.parameters(), lr=10.0)
    x, c = torch.randn(4, 1, 8, 8), torch.randn(4)
    for _ in range(2):
        opt.zero_grad()
        net(x, c).pow(2).mean().backward()
        opt.step()
    moved = [m.weight.detach().clone() for m in net.modules() if isinstance(m, MPConv)]
    net(x, c)  # the forward after the step re-normalises what the step moved
    for layer in (m for m in net.modules() if isinstance(m, MPConv)):
        row_rms = layer.weight.flatten(1).pow(2).mean(dim=1).sqrt()
        torch.testing.assert_close(row_rms, torch.full_like(row_rms, 1.0), atol=2e-4, rtol=0)
    assert any((before.flatten(1).pow(2).mean(1).sqrt() - 1).abs().max() > 0.01 for before in moved)
    # Neither an eval forward nor a frozen copy (a target network, an EMA) changes its weights.
    frozen = tiny_edm2().requires_grad_(False)
    before = [p.clone() for p in frozen.parameters()]
    frozen(x, c)
    frozen.eval()(x, c)
    assert all(torch.equal(p, q) for p, q in zip(before, frozen.parameters()))


def test_forced_normalisation_on_a_net_without_mp_layers_stops():
    objective = EDM2Denoising(edm_denoiser(noise_kind="edm"))
    with pytest.raises(ConfigError, match="ADMUNet has no magnitude-preserving layers; use net=edm2_"):
        objective.check(tiny_net())


@pytest.mark.parametrize("embedding", ["fourier", "positional"])
def test_jvp_equals_central_finite_difference(embedding):
    torch.manual_seed(0)
    net = tiny_edm2(0.8, time_embedding=embedding, dropout=0.3, dropout_resolutions=(4,)).double().eval()
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0.3, 1.1], dtype=torch.float64)
    v = torch.randn_like(x)
    f = lambda x, t: net(x, t)  # noqa: E731
    _, tangent = jvp(f, (x, t), (v, torch.ones_like(t)))
    h = 1e-5
    with torch.no_grad():
        central = (f(x + h * v, t + h) - f(x - h * v, t - h)) / (2 * h)
    torch.testing.assert_close(tangent, central, rtol=1e-6, atol=1e-7)
    assert tangent.abs().max() > 1e-3


def test_resolutions_the_net_never_reaches_stop():
    with pytest.raises(ConfigError, match=r"net.attention_resolutions contains \[32\], which the net never reaches"):
        EDM2UNet(8, 1, 0, 16, (1, 2), 1, (32, 4), 16)


def test_dropout_only_at_the_named_resolutions():
    net = EDM2UNet(16, 1, 0, 16, (1, 2, 2), 1, (4,), 16, dropout=0.45, dropout_resolutions=(8, 4))
    rates = {name: block.dropout for name, block in [*net.enc.items(), *net.dec.items()] if hasattr(block, "dropout")}
    assert {n: p for n, p in rates.items() if p} == {n: 0.45 for n in rates if not n.startswith("16x16")}
    assert rates["16x16_block0"] == 0.0


def test_bf16_forward_with_upsampling_in_fp32_as_cuda_autocast_runs_it(monkeypatch):
    """CUDA's autocast runs upsample_nearest2d in fp32 (CPU's keeps the input dtype): the up blocks' fp32 skip
    then met a bf16 branch in mp_sum's lerp, and every EDM2 step under bf16-mixed stopped on the first GPU."""
    upsample = torch.nn.functional.interpolate
    monkeypatch.setattr(torch.nn.functional, "interpolate", lambda *a, **k: upsample(*a, **k).float())
    net = tiny_edm2(gain=0.5).eval()
    x, sigma = torch.randn(2, 1, 8, 8), torch.rand(2)
    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        out = net(x, sigma)
    assert out.dtype == torch.float32 and out.isfinite().all()


def test_power_function_profile_at_known_points():
    # FastGen's EDM2 configs keep std 0.010, 0.050, 0.100 as gamma 96.99, 16.97, 6.94; eq. 123 maps them back.
    for std, gamma in [(0.010, 96.99), (0.050, 16.97), (0.100, 6.94)]:
        assert std_to_gamma(std) == pytest.approx(gamma, abs=0.01)
        assert gamma_to_std(std_to_gamma(std)) == pytest.approx(std, rel=1e-9)
    # The average after t updates weights update j by (1 - (1 - 1/j)^(gamma+1)) (j/t)^(gamma+1): a power function
    # of relative std sigma_rel over the run, summing to one.
    gamma, t = std_to_gamma(0.1), 2000
    weights = torch.zeros(t, dtype=torch.float64)
    for k in range(1, t + 1):
        beta = power_beta(gamma, k)
        weights *= beta
        weights[k - 1] = 1 - beta
    j = torch.arange(1, t + 1, dtype=torch.float64)
    torch.testing.assert_close(weights, (1 - (1 - 1 / j) ** (gamma + 1)) * (j / t) ** (gamma + 1))
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-12) and power_beta(gamma, 1) == 0.0
    mean = (weights * j).sum()
    assert math.sqrt((weights * (j - mean) ** 2).sum()) / t == pytest.approx(0.1, rel=0.01)
    with pytest.raises(ConfigError, match="ema_stds contains 0.3"):
        std_to_gamma(0.3)


def test_power_ema_follows_the_steps_and_sits_after_the_constant_rates():
    torch.manual_seed(0)
    objective = EDM2Denoising(edm_denoiser(noise_kind="edm"))
    module = GenerativeModule(
        tiny_edm2(), objective, functools.partial(torch.optim.Adam, lr=1e-2), ema_rates=(0.9,), ema_stds=(0.1,)
    )
    snapshots = []
    record = lambda *args: snapshots.append(module.net.out_gain.detach().clone())  # noqa: E731
    module.on_train_batch_end = record
    data = DataLoader(TensorDataset(torch.randn(12, 1, 8, 8), torch.zeros(12, dtype=torch.long)), batch_size=4)
    cpu_trainer(max_steps=3).fit(module, data)
    gamma = std_to_gamma(0.1)  # the k-th update has beta_k = (1 - 1/k)^(gamma + 1): the first copies the weights
    expected = snapshots[0]
    for k, value in enumerate(snapshots[1:], start=2):
        expected = power_beta(gamma, k) * expected + (1 - power_beta(gamma, k)) * value
    torch.testing.assert_close(module.ema[1].out_gain, expected)
    assert not torch.equal(module.ema[0].out_gain, module.ema[1].out_gain)  # the 0.9 EMA is ema[0]


def test_edm2_loss_is_the_uncertainty_weighted_error():
    torch.manual_seed(0)
    objective = EDM2Denoising(edm_denoiser(noise_kind="edm"), p_mean=-0.4, p_std=1.0)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    u = objective.uncertainty(sigma)
    # u(sigma) = MPConv(MPFourier(ln(sigma) / 4)): a unit-norm row of 128 weights on unit-RMS features.
    features = objective.logvar_fourier(sigma.log() / 4)
    w = objective.logvar_linear.weight
    torch.testing.assert_close(u, features @ (w / w.norm()).squeeze(0), rtol=1e-4, atol=1e-6)
    # Minimised over u, lambda e / exp(u) + u is smallest at u = ln(lambda e): the learned u tracks the log error.
    error = torch.tensor(0.37)
    u_grid = torch.linspace(-5, 5, 10001)
    assert u_grid[(error / torch.exp(u_grid) + u_grid).argmin()].item() == pytest.approx(math.log(0.37), abs=1e-3)


def test_tiny_edm2_teacher_and_scd_student_train_and_sample_from_the_cli(tmp_path):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    common = ["net=edm2_tiny", "+debug=tiny", "logger=none", "callbacks.metrics=null", "trainer.max_steps=2"]
    train_here(["experiment=digits_edm", "model=edm2", *common], teacher)
    ckpt = torch.load(teacher / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    meta = ckpt["cm_lightning"]
    assert ckpt["global_step"] == 2 and meta["ema_stds"] == [0.05, 0.1] and len(meta["ema_rates"]) == 1
    state = ckpt["state_dict"]
    assert {"objective.logvar_linear.weight", "ema.2.out_gain", "net.enc.16x16_conv.weight"} <= set(state)
    assert all(torch.isfinite(v).all() for v in state.values())
    # sCD through the EDM2 net's JVP, the student starting as the teacher (fed its ln(sigma) / 4, where digits_scd
    # feeds its TrigFlow teacher's t); digits_scd sets the ADM-only net.double_norm, which an EDM2 net does not take.
    train_here(
        [
            "experiment=digits_scd",
            "model.objective.parameterisation.noise_kind=edm",
            "~net.double_norm",
            f"model.teacher_ckpt={teacher / 'checkpoints' / 'last.ckpt'}",
            *common,
        ],
        student,
    )
    ckpt = torch.load(student / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert list((teacher / "samples").glob("final_*.png")) and list((student / "samples").glob("final_*.png"))


EDM2_RUN = ["experiment=digits_edm", "model=edm2", "net=edm2_tiny", "+debug=tiny", "logger=none"]
EDM2_RUN += ["callbacks.metrics=null", "trainer.accelerator=cpu", "trainer.deterministic=true", "data.batch_size=8"]


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_power_ema_resumes_bit_exactly_and_agrees_over_two_processes(tmp_path):
    whole, halves, ranks = tmp_path / "whole", tmp_path / "halves", tmp_path / "ranks"
    run_script("train.py", *EDM2_RUN, "trainer.max_steps=4", f"hydra.run.dir={whole}")
    run_script("train.py", *EDM2_RUN, "trainer.max_steps=2", f"hydra.run.dir={halves}")
    run_script("train.py", *EDM2_RUN, "trainer.max_steps=4", f"hydra.run.dir={halves}")  # resumes its last.ckpt
    run_script("train.py", *EDM2_RUN, "trainer.max_steps=4", "trainer.devices=2", f"hydra.run.dir={ranks}")
    a, b, c = final_state(whole), final_state(halves), final_state(ranks)
    assert a.keys() == b.keys() == c.keys() and any(k.startswith("ema.2.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
        torch.testing.assert_close(a[key], c[key], rtol=0, atol=1e-5, msg=key)


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_ect_imagenet64_is_locuslabs_edm2_s_run():
    cfg = composed("experiment=imagenet64_ect")
    pair, model = cfg.model.objective.pair, cfg.model
    assert cfg.hydra.runtime.choices.net == "edm2_img64_s" and cfg.net.num_classes == 1000
    assert (cfg.data.batch_size, cfg.trainer.max_steps, model.lr_decay_ref, model.warmup_steps) == (
        128,
        100_000,
        2000,
        0,
    )
    assert (model.optimizer.lr, list(model.optimizer.betas), model.optimizer.eps) == (1e-3, [0.9, 0.99], 1e-8)
    assert (cfg.net.dropout, list(cfg.net.dropout_resolutions)) == (0.4, [16, 8])
    assert (pair.p_mean, pair.p_std, pair.weighting) == (-0.8, 1.6, "inverse_square")
    assert (pair.curriculum.q, pair.curriculum.k, pair.curriculum.b, pair.curriculum.double_every) == (4, 8, 1, 25_000)
    c = model.objective.distance.c_scale * math.sqrt(3 * 64 * 64)
    assert c == pytest.approx(0.06, rel=1e-5) and model.init_from_teacher
    assert list(model.ema_rates) == [0.9999] and list(model.ema_stds) == [0.05, 0.1]


def test_posthoc_reconstruction_of_another_std_from_snapshots():
    """Power EMAs of std 0.05 and 0.10 stored every 100 of 1,000 steps of a random walk combine into the EMA of
    std 0.075 at the last step, as tracked directly, up to the profile fit's residual."""
    torch.manual_seed(0)
    walk = torch.randn(1000, 256, dtype=torch.float64).cumsum(0)
    stds, tracked = (0.05, 0.10), {}
    averages = {s: walk[0].clone() for s in (*stds, 0.075)}
    for k in range(1, 1001):
        for s in averages:
            beta = power_beta(std_to_gamma(s), k)
            averages[s] = beta * averages[s] + (1 - beta) * walk[k - 1]
        if k % 100 == 0:
            tracked.update({(k, s): averages[s].clone() for s in stds})
    keys = sorted(tracked)
    x = posthoc_coefficients([k for k, _ in keys], [s for _, s in keys], 1000, 0.075)
    rebuilt = sum(float(c) * tracked[key] for c, key in zip(x, keys))
    spread = (averages[0.05] - averages[0.10]).abs().mean()  # how far apart the stored averages are
    assert (rebuilt - averages[0.075]).abs().mean() < 0.01 * spread  # the midpoint of the two is 0.09 off
    assert x.sum() == pytest.approx(1.0)


def test_posthoc_ema_from_a_runs_checkpoints_samples(tmp_path):
    run = tmp_path / "run"
    overrides = [*EDM2_RUN, "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=1"]
    train_here(overrides, run)
    assert posthoc_ema.main([str(run / "checkpoints"), "0.075"]) == 0
    out = torch.load(run / "checkpoints" / "posthoc_0.075.ckpt", map_location="cpu", weights_only=True)
    meta, state = out["cm_lightning"], out["state_dict"]
    assert meta["ema_stds"] == [0.05, 0.1, 0.075] and meta["sample_ema"] == 3 and out["global_step"] == 4
    # ema.0 is the 0.999 rate, ema.1 and ema.2 the stored power EMAs, ema.3 their fitted combination.
    stored = [load_file(run / "checkpoints" / f"step{k:07d}.ckpt", "snapshot")["state_dict"] for k in range(1, 5)]
    x = posthoc_coefficients([k for k in range(1, 5) for _ in (0, 1)], [0.05, 0.1] * 4, 4, 0.075)
    gains = [state_dict[f"ema.{i}.out_gain"].double() for state_dict in stored for i in (1, 2)]
    torch.testing.assert_close(state["ema.3.out_gain"].double(), sum(float(w) * g for w, g in zip(x, gains)))
    images, _ = sampler_from_checkpoint(run / "checkpoints" / "posthoc_0.075.ckpt")(2, steps=2, solver="euler")
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    assert posthoc_ema.main([str(run / "checkpoints"), "0.075"]) == 2  # the output exists: refused


# train_edm2.py config_presets: (lr, dropout, Mi images) at batch 2048.
TEACHERS = {"xs": (0.012, 0.0, 2048), "s": (0.01, 0.0, 2048), "m": (0.009, 0.1, 2048), "l": (0.008, 0.1, 1792)}
TEACHERS |= {"xl": (0.007, 0.1, 1280), "xxl": (0.0065, 0.1, 896)}


@pytest.mark.parametrize("name", TEACHERS)
def test_imagenet512_teachers_and_students_are_the_presets(name):
    lr, dropout, mimg = TEACHERS[name]
    cfg = composed(f"experiment=imagenet512_edm2_{name}")
    model = cfg.model
    assert cfg.hydra.runtime.choices.data == "imagenet512_latent" and cfg.hydra.runtime.choices.net == f"edm2_{name}"
    assert (model.optimizer.lr, cfg.net.dropout, cfg.trainer.max_steps) == (lr, dropout, (mimg << 20) // 2048)
    assert (model.lr_decay_ref, model.warmup_steps, list(model.ema_stds)) == (70_000, 4883, [0.05, 0.1])
    assert (model.objective.p_mean, model.objective.p_std, cfg.data.batch_size) == (-0.4, 1.0, 2048)
    if name != "xs":  # sCM distils S to XXL
        cfg = composed(f"experiment=imagenet512_scd_{name}")
        objective = cfg.model.objective
        assert cfg.hydra.runtime.choices.net == f"edm2_{name}" and objective.distill and cfg.model.init_from_teacher
        assert (objective.p_mean, objective.p_std, objective.parameterisation.noise_kind) == (-0.8, 1.6, "edm")
        with torch.device("meta"):
            net = hydra.utils.instantiate(cfg.net)
        assert sum(p.numel() for p in net.parameters()) + 128 == LAYOUT[f"edm2-img512-{name}"]["num_params"]
