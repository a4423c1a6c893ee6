"""NVlabs EDM's released pickles (SongUNet DDPM++ / NCSN++, DhariwalUNet ADM inside EDMPrecond) load into this
project's NCSNpp and ADMUNet: every official key of the published configs lands on one of ours with its shape;
a pickle written here in persistence's format denoises as EDM's own forward (``edm_denoiser`` below, written
from the architecture in EDM's layout, independent of the mapping) while its module source never runs; the
CIFAR-10 experiments that start from EDM's DDPM++ load it; a file of another family stops in one line."""

import math
import pickle

import numpy
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT
from helpers.edm_pickles import LAYOUT, install_persistence, random_state, write_edm_pickle
from helpers.fixtures import write_cifar_fixture
from helpers.launch import compose_run, fails, run_script
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cm_lightning.errors import ConfigError
from cm_lightning.loading import load_teacher, sampler_from_checkpoint
from cm_lightning.nets.edm_config import hint, net_config, signature
from cm_lightning.nets.edm_layout import convert
from cm_lightning.nvlabs_pickle import read_pickle

PUBLISHED = [name for name in LAYOUT if name.startswith("edm-")]
TINY = [name for name in LAYOUT if name.startswith("tiny-")]


@pytest.fixture
def persistence(monkeypatch):
    return install_persistence(monkeypatch)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "the pickle's module source ran"


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def net_from_hint(name: str) -> torch.nn.Module:
    """The net ``net=<config> net.<key>=<value> ...`` (the hint a mismatch names) configures."""
    entry = LAYOUT[name]
    base, *overrides = hint(entry["backbone"], entry["kwargs"], name).split()
    cfg = OmegaConf.load(ROOT / "conf" / "net" / f"{base.split('=')[1]}.yaml")
    cfg.merge_with_dotlist([o.removeprefix("net.") for o in overrides])
    return instantiate(cfg)


# --- the layouts --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PUBLISHED)
def test_every_official_key_lands_on_one_of_ours_with_its_shape(name):
    entry = LAYOUT[name]
    with torch.device("meta"):
        edm = {k: torch.empty(shape) for k, shape in entry["state_dict"]}
        ours = net_from_hint(name)
        expected = instantiate(net_config(entry["backbone"], entry["kwargs"], name))
    assert signature(ours) == signature(expected)  # conf/net's published config (+ the hint) is EDM's net
    mapped = convert(entry["backbone"], entry["kwargs"], edm, name)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    # EDM's weights are ours plus the dropped ones: the augmentation input and SongUNet's label bias (folded).
    kw = entry["kwargs"]
    noise = kw["model_channels"] * kw.get("channel_mult_noise", 1) if entry["backbone"] == "SongUNet" else 0
    dropped = kw.get("augment_dim", 0) * (noise or kw["model_channels"]) + (noise if kw["label_dim"] else 0)
    assert sum(p.numel() for p in ours.parameters()) + dropped == entry["num_params"]
    filters = sum(k.endswith("resample_filter") for k in edm)
    assert len(mapped) == entry["num_tensors"] - filters - bool(kw.get("augment_dim")) - bool(noise and kw["label_dim"])


def test_the_released_cifar10_and_imagenet_files_need_no_override():
    hints = {name: hint(LAYOUT[name]["backbone"], LAYOUT[name]["kwargs"], name) for name in PUBLISHED}
    assert hints["edm-cifar10-32x32-uncond-vp"] == "net=ddpmpp_cifar10"
    assert hints["edm-cifar10-32x32-uncond-ve"] == "net=ncsnpp_cifar10"
    assert hints["edm-imagenet-64x64-cond-adm"] == "net=adm_imagenet64"
    assert hints["edm-ffhq-64x64-uncond-vp"] == "net=ddpmpp_cifar10 net.image_size=64 net.channel_mult=[1,2,2,2]"


@pytest.mark.parametrize("name", TINY)
def test_every_weight_lands_once_with_its_values(name):
    """Each of our tensors holds exactly the values of one EDM tensor (re-laid out); only SongUNet's label
    embedding is computed (its Linear's columns, scaled, plus the bias)."""
    entry, state = LAYOUT[name], random_state(name)
    mapped = convert(entry["backbone"], entry["kwargs"], state, name)
    song = entry["backbone"] == "SongUNet"
    pool = {k: v.flatten().sort().values for k, v in state.items() if not k.endswith("resample_filter")}
    for key, value in mapped.items():
        if song and key == "map_label.weight":
            continue
        values = value.flatten().sort().values
        matches = [k for k, v in pool.items() if v.shape == values.shape and torch.equal(v, values)]
        assert len(matches) == 1, (key, matches)
        del pool[matches[0]]
    folded = {"map_label.weight", "map_label.bias"} if song else set()
    assert set(pool) == ({"map_augment.weight"} | folded) & set(state)  # dropped, or folded into map_label


# --- EDM's forward, written from its architecture in its own layout ------------------------------------------


def conv(x, st, name, down=False, up=False, fused=False):
    """EDM's Conv2d: an optional 2x resampling by the stored filter around an optional kernel (``fused``: the
    kernel first, padded by the filter's reach, then the unpadded downsampling)."""
    w, b, f = st.get(f"{name}.weight"), st.get(f"{name}.bias"), st.get(f"{name}.resample_filter")
    fp = 0 if f is None else (f.shape[-1] - 1) // 2
    if fused:
        x = F.conv2d(x, w, padding=w.shape[-1] // 2 + fp)
        x = F.conv2d(x, f.tile(x.shape[1], 1, 1, 1), groups=x.shape[1], stride=2)
        return x + b[:, None, None]
    if up:
        x = F.conv_transpose2d(x, (f * 4).tile(x.shape[1], 1, 1, 1), groups=x.shape[1], stride=2, padding=fp)
    if down:
        x = F.conv2d(x, f.tile(x.shape[1], 1, 1, 1), groups=x.shape[1], stride=2, padding=fp)
    if w is not None:
        x = F.conv2d(x, w, padding=w.shape[-1] // 2)
    return x if b is None else x + b[:, None, None]


def norm(x, st, name, eps):
    return F.group_norm(x, min(32, x.shape[1] // 4), st[f"{name}.weight"], st[f"{name}.bias"], eps)


def block(x, emb, st, name, song: bool):
    """EDM's UNetBlock: SongUNet's (additive embedding, sqrt(1/2) skips, one head) or DhariwalUNet's (scale and
    shift, plain skips, 64 channels per head)."""
    eps, skip_scale, up, down = (
        (1e-6 if song else 1e-5),
        (math.sqrt(0.5) if song else 1.0),
        "_up" in name,
        "_down" in name,
    )
    h = conv(F.silu(norm(x, st, f"{name}.norm0", eps)), st, f"{name}.conv0", down, up)
    params = F.linear(emb, st[f"{name}.affine.weight"], st[f"{name}.affine.bias"])[:, :, None, None]
    if song:
        h = F.silu(norm(h + params, st, f"{name}.norm1", eps))
    else:
        scale, shift = params.chunk(2, dim=1)
        h = F.silu(shift + norm(h, st, f"{name}.norm1", eps) * (scale + 1))
    h = conv(h, st, f"{name}.conv1")
    skip = f"{name}.skip.resample_filter" in st or f"{name}.skip.weight" in st
    x = (h + (conv(x, st, f"{name}.skip", down, up) if skip else x)) * skip_scale
    if f"{name}.qkv.weight" in st:
        heads = 1 if song else x.shape[1] // 64
        qkv = conv(norm(x, st, f"{name}.norm2", eps), st, f"{name}.qkv")
        q, k, v = qkv.reshape(x.shape[0] * heads, x.shape[1] // heads, 3, -1).unbind(2)
        w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(k.shape[1])).softmax(dim=2)
        a = torch.einsum("nqk,nck->ncq", w, v).reshape(x.shape)
        x = (conv(a, st, f"{name}.proj") + x) * skip_scale
    return x


def embedding(c, st, kw, song: bool):
    """EDM's noise embedding: Fourier (NCSN++) or positional (DDPM++ with endpoint, ADM without)."""
    if kw.get("embedding_type") == "fourier":
        args = c.outer(2 * math.pi * st["map_noise.freqs"])
    else:
        half = kw["model_channels"] * kw.get("channel_mult_noise", 1) // 2
        args = c.outer((1 / 10000) ** (torch.arange(half) / (half - int(song))))
    emb = torch.cat([args.cos(), args.sin()], dim=1)
    return torch.cat([emb[:, emb.shape[1] // 2 :], emb[:, : emb.shape[1] // 2]], dim=1) if song else emb


def edm_backbone(x, c, onehot, st, kw, song: bool):
    emb = embedding(c, st, kw, song)
    linear = lambda v, n: F.linear(v, st[f"{n}.weight"], st.get(f"{n}.bias"))  # noqa: E731
    if song:
        emb = emb + linear(onehot * math.sqrt(onehot.shape[1]), "map_label") if onehot is not None else emb
        emb = F.silu(linear(F.silu(linear(emb, "map_layer0")), "map_layer1"))
    else:
        emb = linear(F.silu(linear(emb, "map_layer0")), "map_layer1")
        emb = F.silu(emb + linear(onehot, "map_label") if onehot is not None else emb)
    names = list(dict.fromkeys(".".join(k.split(".")[:2]) for k in st if k.startswith(("enc.", "dec."))))
    skips, aux = [], x
    for name in [n for n in names if n.startswith("enc.")]:
        if name.endswith("_aux_residual"):
            x = skips[-1] = aux = (x + conv(aux, st, name, fused=True)) / math.sqrt(2)
        else:
            x = conv(x, st, name) if name.endswith("_conv") else block(x, emb, st, name, song)
            skips.append(x)
    for name in [n for n in names if n.startswith("dec.") and "_aux_" not in n]:
        if x.shape[1] != st[f"{name}.norm0.weight"].shape[0]:
            x = torch.cat([x, skips.pop()], dim=1)
        x = block(x, emb, st, name, song)
    out = next(n for n in names if n.endswith("_aux_norm")).removesuffix("_aux_norm") if song else None
    eps, (n_norm, n_conv) = (1e-6, (f"{out}_aux_norm", f"{out}_aux_conv")) if song else (1e-5, ("out_norm", "out_conv"))
    return conv(F.silu(norm(x, st, n_norm, eps)), st, n_conv)


def edm_denoiser(x, sigma, onehot, st, kw, song: bool):
    """EDMPrecond: D = c_skip x + c_out F(c_in x, ln(sigma) / 4), sigma_data 0.5."""
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt(), 1 / (0.25 + s**2).sqrt()
    return c_skip * x + c_out * edm_backbone(c_in * x, sigma.log() / 4, onehot, st, kw, song)


@pytest.mark.parametrize("name", TINY)
def test_a_pickle_denoises_as_edm_and_its_source_never_runs(name, persistence, tmp_path, marker):
    entry, state = LAYOUT[name], random_state(name)
    path = write_edm_pickle(tmp_path / f"{name}.pkl", persistence, name, state, marker)
    kw, song = entry["kwargs"], entry["backbone"] == "SongUNet"
    like = net_from_hint(name)
    like.noise_kind = "adm"  # a configured ADM conditioning is overridden: the file's weights want EDM's
    teacher = load_teacher(path, like=like)
    sampler = sampler_from_checkpoint(path)  # no net=: the file says which net holds it
    gen = torch.Generator().manual_seed(1)
    size, classes = kw["img_resolution"], kw["label_dim"]
    x = torch.randn(3, 3, size, size, generator=gen)
    labels = torch.randint(0, classes, (3,), generator=gen) if classes else None
    onehot = F.one_hot(labels, classes).float() if classes else None
    for s in (0.002, 0.4, 7.0, 80.0):
        sigma = torch.full((3,), s)
        with torch.no_grad():
            reference = edm_denoiser(x * (1 + s), sigma, onehot, state, kw, song)
            torch.testing.assert_close(teacher(x * (1 + s), sigma, labels), reference, atol=2e-5, rtol=1e-5)
            ours = sampler.parameterisation(sampler.net, x * (1 + s), sigma, labels)
            torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-5)
    assert teacher.parameterisation.noise_kind == "edm" and sampler.parameterisation.noise_kind == "edm"


# --- the experiments and the command line ----------------------------------------------------------------------

SHRUNK = ["net.model_channels=16", "net.channel_mult=[1,2]", "net.num_res_blocks=1", "net.attention_resolutions=[16]"]
FASTGEN_EMA = [0.9999, 0.99995, 0.9996]
# (batch, steps, dropout, EMA rates): locuslab/ect run_ecm.sh; FastGen's config_sct_cifar10.py, config_scd_cifar10.py.
RUNS = {
    "cifar10_ect": (128, 200_000, 0.2, [0.9999]),
    "cifar10_sct_fastgen": (512, 350_000, 0.2, FASTGEN_EMA),
    "cifar10_scd_fastgen": (512, 500_000, 0.0, FASTGEN_EMA),
}


@pytest.mark.parametrize("experiment", sorted(RUNS))
def test_the_cifar10_experiments_start_from_the_edm_pickle(experiment, persistence, tmp_path, marker):
    published = compose_run("train", [f"experiment={experiment}"], tmp_path / "published")
    assert (published.data.batch_size, published.trainer.max_steps, published.net.dropout) == RUNS[experiment][:3]
    assert list(published.model.ema_rates) == RUNS[experiment][3] and published.model.optimizer.lr == 1e-4
    assert published.model.teacher_ckpt == "edm-cifar10-32x32-uncond-vp.pkl" and published.model.init_from_teacher
    objective = published.model.objective
    if experiment != "cifar10_ect":  # FastGen's config_scm.py
        assert list(published.model.optimizer.betas) == [0.9, 0.99] and (objective.p_mean, objective.p_std) == (-1, 1.4)
        assert (
            objective.tangent_norm == "rms" and objective.prior_weighting and objective.distill == ("scd" in experiment)
        )
    state = random_state("tiny-ddpmpp")
    path = write_edm_pickle(tmp_path / "edm-cifar10-32x32-uncond-vp.pkl", persistence, "tiny-ddpmpp", state, marker)
    overrides = [f"experiment={experiment}", f"model.teacher_ckpt={path}", *SHRUNK, "logger=none"]
    cfg = compose_run("train", overrides, tmp_path / "run")
    assert cfg.net._target_.endswith("NCSNpp") and cfg.net.embedding_endpoint  # DDPM++ with EDM's frequencies
    model = instantiate(cfg.model)  # the student starts as the teacher, as ECT and sCM start from EDM's
    assert model.parameterisation.noise_kind == "edm"
    teacher = load_teacher(path, like=model.net)
    assert all(torch.equal(v, teacher.net.state_dict()[k]) for k, v in model.net.state_dict().items())


def test_another_family_stops_in_one_line_naming_the_net(persistence, tmp_path, marker):
    path = write_edm_pickle(tmp_path / "ddpmpp.pkl", persistence, "tiny-ddpmpp", random_state("tiny-ddpmpp"), marker)
    with torch.device("meta"):
        adm = instantiate(OmegaConf.load(ROOT / "conf" / "net" / "adm_imagenet64.yaml"))
    with pytest.raises(
        ConfigError,
        match=r"ddpmpp\.pkl holds EDM's DDPM\+\+ U-Net \(SongUNet\); the configured net "
        r"\(ADMUNet\) is another family: use net=ddpmpp_cifar10 net.model_channels=16",
    ) as info:
        load_teacher(path, like=adm)
    assert "\n" not in str(info.value)
    like = net_from_hint("tiny-ddpmpp")
    like.map_noise.endpoint = False  # DDPM++ as this project trained it before EDM's frequencies
    with pytest.raises(ConfigError, match=r"\(NCSNpp\) computes it differently: use net=ddpmpp_cifar10"):
        load_teacher(path, like=like)
    adm = ["net=adm_imagenet64", "net.image_size=32", "net.model_channels=32", "net.channel_mult=[1,2]"]
    adm += ["net.num_res_blocks=1", "net.attention_resolutions=[16]", "net.num_head_channels=32"]
    write_cifar_fixture(tmp_path / "cifar10", n=4)
    run = [f"data.root={tmp_path / 'cifar10'}", f"hydra.run.dir={tmp_path / 'run'}"]
    stderr = fails("train.py", "experiment=cifar10_ect", *adm, f"model.teacher_ckpt={path}", *run)
    assert (
        f"model.teacher_ckpt={path} holds EDM's DDPM++ U-Net (SongUNet)" in stderr
        and "use net=ddpmpp_cifar10" in stderr
    )


def test_evaluate_samples_the_pickle_with_no_net_named(persistence, tmp_path, marker):
    path = write_edm_pickle(tmp_path / "edm.pkl", persistence, "tiny-ddpmpp", random_state("tiny-ddpmpp"), marker)
    out = tmp_path / "eval"
    run_script("evaluate.py", f"ckpt={path}", "num=2", "steps=[2]", "device=cpu", f"hydra.run.dir={out}")
    assert list(out.glob("*.png"))


class ObjectScalar:
    """Pickles as a NumPy scalar of Python objects, which would carry an arbitrary object."""

    def __reduce__(self):
        from numpy._core.multiarray import scalar

        return scalar, (numpy.dtype(object), [1])


def test_a_numpy_scalar_of_objects_stops_in_one_line(tmp_path):
    """(EDM's plain NumPy scalars, its blocks' skip scale, load in every pickle above.)"""
    path = tmp_path / "scalars.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": ObjectScalar()}, f)
    with pytest.raises(ConfigError, match="is not a readable NVlabs network pickle .*not plain data"):
        read_pickle(path)
