"""Zero-shot editing (CM Algorithm 4): the transforms against their definitions, the routine's
invariants on small untrained networks, and the colour digits it is shown on."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.builders import randomise, tiny_net

from cm_lightning.data.digits import DigitsDataModule, colour_digits_tensor, colour_pairs, digits_tensor
from cm_lightning.diffusion import editing
from cm_lightning.diffusion.linear_transforms import LUMINANCE, ChannelBasis, Identity, PatchBasis, orthonormal_basis
from cm_lightning.diffusion.precond import consistency_function
from cm_lightning.diffusion.sampling import sigmas_from_indices
from cm_lightning.errors import ConfigError

EPS = 0.002
PARAM = consistency_function(sigma_min=EPS)


def consistency_f(channels=3, num_classes=0, labels=None, seed=0):
    torch.manual_seed(seed)
    net = randomise(tiny_net(channels=channels, num_classes=num_classes), std=0.05).eval()
    precond = consistency_function()
    return lambda x, s: precond(net, x, s, labels)


def operator_matrix(transform, shape):
    """The (D x D) matrix of a transform on images of ``shape`` (C, H, W), column by column."""
    d = math.prod(shape)
    return transform(torch.eye(d).reshape(d, *shape)).reshape(d, d).T


TRANSFORMS = [
    ("identity", Identity(), (3, 8, 8)),
    ("colour", ChannelBasis(LUMINANCE), (3, 8, 8)),
    ("patch2", PatchBasis(2), (3, 8, 8)),
    ("patch4", PatchBasis(4), (1, 8, 8)),
    ("patch8", PatchBasis(8), (2, 16, 16)),
]


@pytest.mark.parametrize("name,transform,shape", TRANSFORMS, ids=[t[0] for t in TRANSFORMS])
def test_transform_is_orthogonal_and_round_trips(name, transform, shape):
    a = operator_matrix(transform, shape)
    assert torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-6)
    x = torch.randn(4, *shape)
    assert torch.allclose(transform.inverse(transform(x)), x, atol=1e-6)
    assert torch.allclose(transform(transform.inverse(x)), x, atol=1e-6)


@pytest.mark.parametrize("v", [LUMINANCE, [1.0] * 4, [1.0] * 16, [1.0] * 64])
def test_basis_first_axis_is_the_normalised_vector(v):
    q = orthonormal_basis(v)
    v = torch.tensor(v)
    assert torch.allclose(q @ q.T, torch.eye(len(v)), atol=1e-6)
    assert torch.allclose(q[:, 0], v / v.norm(), atol=1e-7)


def test_kept_parts_are_luminance_and_patch_means():
    y = torch.rand(2, 3, 8, 8) * 2 - 1
    w = torch.tensor(LUMINANCE)
    colour = ChannelBasis(LUMINANCE)
    lum = torch.einsum("bchw,c->bhw", y, w)
    assert torch.allclose(colour(y)[:, 0], lum / w.norm(), atol=1e-6)
    kept = editing.degrade(y, colour, colour.keep_first(y.shape))
    assert torch.allclose(kept, lum[:, None] * (w / w.norm() ** 2)[None, :, None, None], atol=1e-6)
    for f in (2, 4, 8):
        patch = PatchBasis(f)
        means = F.avg_pool2d(y, f)
        assert torch.allclose(patch(y)[..., ::f, ::f], f * means, atol=1e-5)
        kept = editing.degrade(y, patch, patch.keep_first(y.shape))
        assert torch.allclose(kept, means.repeat_interleave(f, -1).repeat_interleave(f, -2), atol=1e-6)


def test_algorithm4_follows_the_formula_step_by_step():
    """With f = 0 every evaluation returns the projection of 0, so the inputs f sees are
    A^T[(Ay)(1 - Omega)] + sigma_1 z_1, then that + sqrt(sigma_2^2 - eps^2) z_2."""
    y = torch.rand(2, 3, 8, 8) * 2 - 1
    transform, sigmas = ChannelBasis(), [80.0, 3.0]
    omega = transform.keep_first(y.shape)
    seen = []

    def f(x, s):
        seen.append((x.clone(), s.clone()))
        return torch.zeros_like(x)

    out = editing.edit(f, y, transform, omega, sigmas, PARAM, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    kept = editing.degrade(y, transform, omega)
    z1, z2 = torch.randn(y.shape, generator=g), torch.randn(y.shape, generator=g)
    assert torch.allclose(seen[0][0], kept + 80.0 * z1, atol=1e-5) and torch.all(seen[0][1] == 80.0)
    assert torch.allclose(seen[1][0], kept + math.sqrt(3.0**2 - EPS**2) * z2, atol=1e-5)
    assert torch.all(seen[1][1] == 3.0) and torch.allclose(out, kept, atol=1e-6)


def inpaint_case(y):
    omega = torch.zeros(y.shape[0], 1, *y.shape[-2:])
    omega[..., 2:6, 1:5] = 1
    return Identity(), omega


def colour_case(y):
    t = ChannelBasis()
    return t, t.keep_first(y.shape)


def superres_case(y):
    t = PatchBasis(4)
    return t, t.keep_first(y.shape)


@pytest.mark.parametrize("case", [inpaint_case, colour_case, superres_case], ids=["inpaint", "colorize", "superres"])
@pytest.mark.parametrize("batch,num_classes", [(1, 0), (5, 0), (3, 4)])
def test_untrained_model_keeps_the_reference_exactly(case, batch, num_classes):
    y = torch.rand(batch, 3, 8, 8) * 2 - 1
    labels = torch.arange(batch) % num_classes if num_classes else None
    f = consistency_f(num_classes=num_classes, labels=labels)
    transform, omega = case(y)
    x = editing.edit(f, y, transform, omega, [80.0, 2.0, 0.5], PARAM, torch.Generator().manual_seed(1))
    assert x.shape == y.shape
    assert torch.allclose(transform(x) * (1 - omega), transform(y) * (1 - omega), atol=1e-5)
    assert not torch.allclose(transform(x) * omega, transform(y) * omega, atol=1e-2)  # the rest is generated


def test_keeping_everything_returns_the_reference():
    y = torch.rand(2, 3, 8, 8) * 2 - 1
    x = editing.edit(consistency_f(), y, Identity(), torch.zeros(1, 1, 8, 8), [80.0], PARAM)
    assert torch.allclose(x, y, atol=1e-6)


def test_interpolation_endpoints_are_the_one_step_samples():
    f = consistency_f()
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(2, 3, 8, 8, generator=g)
    frames = editing.interpolate(f, z0, z1, 5, PARAM)
    ends = f(80.0 * torch.stack([z0, z1]), torch.full((2,), 80.0)).clamp(-1, 1)
    assert frames.shape == (5, 3, 8, 8)
    assert torch.allclose(frames[0], ends[0], atol=1e-5) and torch.allclose(frames[-1], ends[1], atol=1e-5)


def test_slerp_by_hand():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = editing.slerp(e1, e2, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(mid, torch.tensor([[1.0, 0.0], [0.5**0.5, 0.5**0.5], [0.0, 1.0]]), atol=1e-6)


def test_denoising_at_sigma_min_returns_the_input_and_larger_sigma_changes_it():
    f = consistency_f()
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    assert torch.equal(editing.denoise(f, x, EPS, PARAM), x)
    assert not torch.allclose(editing.denoise(f, x, 1.0, PARAM), x, atol=1e-3)


def test_stroke_guided_starts_from_the_noised_strokes():
    y, noise = torch.rand(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    seen = []
    editing.stroke_guided(lambda x, s: seen.append(x) or x, y, noise, [2.0], PARAM)
    assert torch.allclose(seen[0], y + 2.0 * noise)


def test_published_default_schedules():
    assert editing.published_edit_sigmas("ct", 151) == sigmas_from_indices([0, 67, 150], 151)
    assert editing.published_edit_sigmas("cd", 40) == sigmas_from_indices([0, 22, 39], 40)
    # grids without a published setting take the method's ImageNet-64 entry, on the model's sigma range
    assert editing.published_edit_sigmas("cd", 18) == sigmas_from_indices([0, 22, 39], 40)
    assert editing.published_edit_sigmas("ct", 11, sigma_max=40.0) == sigmas_from_indices(
        [0, 106, 200], 201, sigma_max=40.0
    )
    assert editing.published_edit_sigmas("ct", 151)[0] == 80.0


def test_bad_schedules_and_masks():
    f, y = consistency_f(), torch.zeros(2, 3, 8, 8)
    with pytest.raises(ConfigError, match=r"edit_sigmas=\[2.0, 80.0\].*strictly decreasing"):
        editing.edit(f, y, Identity(), torch.ones(1, 1, 8, 8), [2.0, 80.0], PARAM)
    with pytest.raises(ConfigError, match=r"mask has shape \(1, 1, 16, 16\).*\(2, 3, 8, 8\)"):
        editing.edit(f, y, Identity(), torch.ones(1, 1, 16, 16), [80.0], PARAM)
    with pytest.raises(ConfigError, match=r"noise range \[0.002, 80.0\]"):
        editing.check_decreasing([120.0, 1.0], "edit_sigmas", EPS, 80.0)
    with pytest.raises(ConfigError, match="num=1"):
        editing.interpolate(f, y[0], y[1], 1, PARAM)


def test_colour_digits_are_seeded_rgb_with_visible_luminance():
    x, labels = colour_digits_tensor(16, seed=0)
    gray, gray_labels = digits_tensor(16)
    assert x.shape == (1797, 3, 16, 16) and torch.equal(labels, gray_labels)
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, colour_digits_tensor(16, seed=0)[0]) and not torch.equal(x, colour_digits_tensor(16, 1)[0])
    fg, bg = colour_pairs(x.shape[0], torch.Generator().manual_seed(0))
    w = torch.tensor(LUMINANCE)
    assert ((fg @ w - bg @ w).abs() >= 0.4).all()  # the digit survives in the luminance colourisation keeps
    ink = (gray[:1] + 1) / 2  # digit 0 is drawn as bg * (1 - ink) + fg * ink with the first pair
    assert torch.allclose((x[:1] + 1) / 2, bg[0, :, None, None] * (1 - ink) + fg[0, :, None, None] * ink, atol=1e-6)
    dm = DigitsDataModule(channels=3, colour=True, batch_size=8)
    dm.setup()
    assert next(iter(dm.train_dataloader()))[0].shape == (8, 3, 16, 16)


def test_colour_flag_and_channels_must_agree():
    with pytest.raises(ConfigError, match="data.channels=3 needs the colour digits.*data=digits_colour"):
        DigitsDataModule(channels=3)
    with pytest.raises(ConfigError, match="data.colour=true.*data.channels=1"):
        DigitsDataModule(channels=1, colour=True)


def test_run_method_reads_the_stored_config(tmp_path):
    from cm_lightning.tasks.editing import run_method

    def ckpt(target):  # a checkpoint of the layout before objectives, curricula and pair rules
        return {"cm_lightning": {"config": {"model": {"target": target}, "trainer": {"max_steps": 100}}}}

    fixed = {"_target_": "cm_lightning.diffusion.karras.FixedSchedule", "num_scales": 40, "mu": 0.95}
    adaptive = {"_target_": "cm_lightning.diffusion.karras.CMAdaptiveSchedule", "s0": 2, "s1": 150, "total_steps": 100}
    ect = {"_target_": "cm_lightning.diffusion.karras.ECTSchedule"}
    assert run_method(ckpt({"_target_": "cm_lightning.diffusion.targets.CDTarget", "schedule": fixed})) == ("cd", 40)
    ct = {"_target_": "cm_lightning.diffusion.targets.CTTarget", "schedule": adaptive}
    assert run_method(ckpt(ct)) == ("ct", 151)
    assert run_method(ckpt({"_target_": "cm_lightning.diffusion.targets.ECTTarget", "schedule": ect})) == ("ct", 0)
    # Since the curriculum got its name and the pair rules theirs:
    fixed["_target_"] = "cm_lightning.diffusion.curricula.FixedCurriculum"
    cd = {"_target_": "cm_lightning.diffusion.pair_rules.CDPairRule", "curriculum": fixed}
    assert run_method(
        {"cm_lightning": {"config": {"model": {"objective": {"pair": cd}}, "trainer": {"max_steps": 1}}}}
    ) == ("cd", 40)
