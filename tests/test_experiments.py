"""Every experiment in conf/experiment/ composes and trains for two steps, on fixture data written in the real
on-disk formats (a CIFAR-10 batch, downsampled-ImageNet .npz batches, an LSUN LMDB), with the network widths
shrunk by overrides; CD-style experiments distil a one-step EDM run of the same shrunk net. The published
settings of the CM paper's experiments are checked against the reference values."""

from pathlib import Path

import pytest
import torch
from helpers import ROOT
from helpers.fixtures import write_cifar_fixture, write_imagenet_batches, write_lsun_lmdb
from helpers.launch import run_script, train_here
from hydra import compose, initialize_config_dir
from torchvision.models.vgg import cfgs, make_layers

from cm_lightning.training import needs_teacher

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
IMAGENET_EMA = [0.999, 0.9999, 0.9999432189950708]
LSUN_EMA = [0.9999, 0.99994, 0.9999432189950708]

# (batch, lr, steps, curriculum, EMA rates, net, classes): CM paper, Appendix C / the reference doc's table.
PUBLISHED = {
    "cifar10_cd": (512, 4e-4, 800_000, dict(num_scales=18, mu=0.0), [0.9999], "ncsnpp_cifar10", 0),
    "cifar10_ct": (512, 4e-4, 800_000, dict(s0=2, s1=150, mu0=0.9), [0.9999], "ncsnpp_cifar10", 0),
    "imagenet64_cd": (2048, 8e-6, 600_000, dict(num_scales=40, mu=0.95), IMAGENET_EMA, "adm_imagenet64", 1000),
    "imagenet64_ct": (2048, 1e-4, 800_000, dict(s0=2, s1=200, mu0=0.95), IMAGENET_EMA, "adm_imagenet64", 1000),
    "lsun_cd": (256, 1e-5, 600_000, dict(num_scales=40, mu=0.95), LSUN_EMA, "adm_lsun256", 0),
    "lsun_ct": (256, 5e-5, 1_000_000, dict(s0=2, s1=150, mu0=0.95), LSUN_EMA, "adm_lsun256", 0),
}


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_settings(name):
    batch, lr, steps, curriculum, ema, net, classes = PUBLISHED[name]
    cfg = composed(f"experiment={name}")
    assert cfg.data.batch_size == batch and cfg.model.optimizer.lr == lr and cfg.trainer.max_steps == steps
    assert {k: cfg.model.objective.pair.curriculum[k] for k in curriculum} == curriculum
    assert list(cfg.model.ema_rates) == ema and cfg.hydra.runtime.choices.net == net
    assert cfg.net.num_classes == classes and cfg.net.dropout == 0.0  # students train without dropout
    assert cfg.model.objective.distance._target_.endswith("LPIPS") and cfg.model.objective.pair.weighting == "uniform"
    assert cfg.model.objective.distance.pooling == "avg"  # the authors' piq LPIPS(replace_pooling=True)
    assert cfg.model.objective.parameterisation.noise_kind == ("edm" if net.startswith("ncsnpp") else "adm")


# sCM (Lu & Song 2025, Appendix G and Table 4): (batch, lr, betas, P_mean, P_std, dropout, net, distill, lr t_ref).
SCM_PUBLISHED = {
    "cifar10_sct": (512, 1e-4, [0.9, 0.99], -1.0, 1.4, 0.2, "ddpmpp_cifar10", False, None),
    "cifar10_scd": (512, 1e-4, [0.9, 0.99], -1.0, 1.4, 0.0, "ddpmpp_cifar10", True, None),
    "imagenet64_sct": (2048, 1e-4, [0.9, 0.99], -1.0, 1.6, 0.45, "edm2_img64_s", False, 35000),
    "imagenet64_scd": (2048, 1e-4, [0.9, 0.99], -1.0, 1.6, 0.0, "edm2_img64_s", True, 35000),
}
# sCD on ImageNet 512 (sCM arXiv v2 Table 5, sCD rows, and Appendix G.2): size -> (lr, dropout at resolutions <= 16).
SCD512_PUBLISHED = {"s": (1e-4, 0.0), "m": (9e-5, 0.1), "l": (8e-5, 0.1), "xl": (7e-5, 0.1), "xxl": (6.5e-5, 0.1)}
SCM_PUBLISHED |= {
    f"imagenet512_scd_{size}": (2048, lr, [0.9, 0.99], -0.8, 1.6, dropout, f"edm2_{size}", True, 70000)
    for size, (lr, dropout) in SCD512_PUBLISHED.items()
}


@pytest.mark.parametrize("name", sorted(SCM_PUBLISHED))
def test_published_scm_settings(name):
    batch, lr, betas, p_mean, p_std, dropout, net, distill, t_ref = SCM_PUBLISHED[name]
    cfg = composed(f"experiment={name}")
    objective = cfg.model.objective
    assert (cfg.data.batch_size, cfg.model.optimizer.lr, list(cfg.model.optimizer.betas)) == (batch, lr, betas)
    assert (objective.p_mean, objective.p_std, objective.distill) == (p_mean, p_std, distill)
    assert (objective.tangent_c, objective.warmup_steps, objective.parameterisation.t_mid) == (0.1, 10000, 1.1)
    assert cfg.net.dropout == dropout and cfg.hydra.runtime.choices.net == net and cfg.model.lr_decay_ref == t_ref
    assert cfg.model.init_from_teacher and objective.parameterisation.noise_kind == cfg.net.noise_kind  # as the teacher


@pytest.mark.parametrize("size", sorted(SCD512_PUBLISHED))
def test_published_scd512_settings(size):
    """The rest of Table 5 and G.2 at 512: 200k iterations, Adam eps 1e-11, dropout at 16 and 8 only, EMA std 0.05."""
    cfg = composed(f"experiment=imagenet512_scd_{size}")
    model, optimizer = cfg.model, cfg.model.optimizer
    assert (cfg.trainer.max_steps, optimizer._target_, optimizer.eps) == (200_000, "torch.optim.Adam", 1e-11)
    assert list(cfg.net.dropout_resolutions) == [16, 8] and cfg.hydra.runtime.choices.data == "imagenet512_latent"
    assert (list(model.ema_rates), list(model.ema_stds), model.warmup_steps) == ([], [0.05], 0)
    assert model.objective.parameterisation.sigma_max == 80.0


def test_published_meanflow_settings():
    """MeanFlow on CIFAR-10: the paper's configuration in the official PyTorch code (scripts/cifar10_v0.sh)."""
    cfg = composed("experiment=cifar10_meanflow")
    objective = cfg.model.objective
    assert (cfg.data.batch_size, cfg.model.optimizer.lr, list(cfg.model.optimizer.betas)) == (1024, 6e-4, [0.9, 0.999])
    assert cfg.model.optimizer._target_ == "torch.optim.Adam" and cfg.trainer.max_steps == 800_000
    assert (objective.p_mean, objective.p_std, objective.fraction) == (-2.0, 2.0, 0.75)
    assert (objective.norm_p, objective.norm_c) == (0.75, 1e-3)
    assert (objective.omega, objective.kappa, objective.label_dropout) == (1.0, 0.0, 0.0)  # unconditional
    assert (cfg.net.dropout, cfg.net.num_times, cfg.hydra.runtime.choices.net) == (0.2, 2, "ddpmpp_cifar10")
    assert cfg.model.ema_rates[0] == 0.9999 and cfg.model.warmup_steps == 9800


def test_published_teachers_and_lsun_cat():
    cfg = composed("experiment=imagenet64_edm")
    assert (cfg.data.batch_size, cfg.model.optimizer.lr, cfg.net.dropout) == (4096, 1e-4, 0.1)
    assert (cfg.model.objective.p_mean, cfg.model.objective.p_std, list(cfg.model.ema_rates)) == (
        -1.2,
        1.2,
        IMAGENET_EMA,
    )
    assert cfg.net.num_classes == 1000 and cfg.data.num_classes == 1000
    cfg = composed("experiment=cifar10_edm")
    assert (
        cfg.hydra.runtime.choices.net == "ncsnpp_cifar10" and cfg.model.objective.parameterisation.noise_kind == "edm"
    )
    cfg = composed("experiment=lsun_cd", "data=lsun_cat")
    assert cfg.data.root.endswith("lsun/cat") and cfg.data._target_.endswith("LSUNDataModule")


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> dict:
    """Fixture data in the real formats and stand-in LPIPS weight files of the right shapes."""
    root = tmp_path_factory.mktemp("disk")
    write_cifar_fixture(root / "cifar10", n=4)
    write_imagenet_batches(root / "imagenet64", size=16, n=6, batches=2)
    write_lsun_lmdb(root / "lsun", n=6)
    torch.manual_seed(0)
    vgg = make_layers(cfgs["D"])
    torch.save({f"features.{k}": v for k, v in vgg.state_dict().items()}, root / "vgg16.pth")
    widths = (64, 128, 256, 512, 512)
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(widths)}, root / "lin.pth")
    return {"root": root, "teachers": {}}


@pytest.fixture(autouse=True)
def cifar_checksums(monkeypatch):
    # torchvision checks md5 sums of the real CIFAR-10 files; the fixture's layout is what is under test.
    monkeypatch.setattr("torchvision.datasets.CIFAR10._check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda path, md5=None: True)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def shrink(cfg, disk: dict) -> list[str]:
    """Overrides that make an experiment's data and network tiny while keeping its data format."""
    root, data, net = disk["root"], cfg.data._target_.rsplit(".", 1)[-1], cfg.net._target_.rsplit(".", 1)[-1]
    size = {"CIFAR10DataModule": 32}.get(data, 16)
    latent512 = cfg.hydra.runtime.choices.data in ("imagenet512_latent", "imagenet256_latent")
    if latent512 or cfg.hydra.runtime.choices.data == "digits_latent":  # the digits VAE's 4x4x4 latents
        size = 4
    out = [
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu",
        "logger=none",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.val_size=4",
        "callbacks.sample_grid.num=2",
        "callbacks.sample_grid.teacher_steps=2",
        "callbacks.metrics=null",
        f"net.image_size={size}",
    ]
    unet = [
        "net.model_channels=16",
        "net.channel_mult=[1,2]",
        "net.num_res_blocks=1",
        f"net.attention_resolutions=[{size // 2}]",
    ]
    out += {
        "CIFAR10DataModule": [f"data.root={root / 'cifar10'}"],
        "ImageNet64DataModule": [f"data.root={root / 'imagenet64'}", f"data.image_size={size}"],
        "LSUNDataModule": [f"data.root={root / 'lsun'}", f"data.image_size={size}"],
    }.get(data, [])
    if latent512:
        out += ["data=digits_latent", f"data.cache_dir={root / 'latent512'}", "net.num_classes=10"]
    per_net = {
        "ADMUNet": [*unet, "net.num_head_channels=16"],
        "NCSNpp": unet,
        "EDM2UNet": [*unet, "net.num_head_channels=16"],
        "DiT": ["net.hidden_size=32", "net.depth=1", "net.num_heads=2", "net.patch_size=4"],
    }
    if net not in per_net:
        pytest.fail(f"no shrinking overrides for net {net}: add them to shrink() in tests/test_experiments.py")
    out += per_net[net]
    distance = cfg.model.objective.get("distance")
    if distance is not None and distance._target_.endswith("LPIPS"):
        key = "model.objective.distance"
        out += [
            f"{key}.lin_weights={root / 'lin.pth'}",
            f"{key}.vgg_weights={root / 'vgg16.pth'}",
            f"{key}.resize_to={size}",
        ]
    return out


def teacher_for(name: str, cfg, disk: dict) -> str:
    """A one-step EDM run of the same shrunk net on the same data (the dataset's *_edm experiment), or its
    TrigFlow teacher (*_trigflow) for a student fed TrigFlow's c_noise(t) = t."""
    choices = cfg.hydra.runtime.choices
    prefix = name.rsplit("_", 1)[0]
    kind = "trigflow" if cfg.model.objective.get("parameterisation", {}).get("noise_kind") == "t" else "edm"
    experiment = f"{prefix}_{kind}" if f"{prefix}_{kind}" in EXPERIMENTS else f"digits_{kind}"
    key = (experiment, choices.data, choices.net)
    if key not in disk["teachers"]:
        overrides = [f"experiment={experiment}", f"data={choices.data}", f"net={choices.net}"]
        run = disk["root"] / "teachers" / "-".join(key)
        train_here([*overrides, *shrink(composed(*overrides), disk), "trainer.max_steps=1"], run)
        disk["teachers"][key] = str(run / "checkpoints" / "last.ckpt")
    return disk["teachers"][key]


# The ImageNet-512 presets differ only in width, which shrink() overrides: one teacher and one student by default.
SAME_SHRUNK = {f"imagenet512_edm2_{s}" for s in ("s", "m", "l", "xl", "xxl")}
SAME_SHRUNK |= {f"imagenet512_scd_{s}" for s in ("s", "m", "l", "xl")}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SAME_SHRUNK else n for n in EXPERIMENTS]
)
def test_experiment_trains_two_steps(name, disk, tmp_path):
    cfg = composed(f"experiment={name}")
    overrides = [f"experiment={name}", *shrink(cfg, disk)]
    if needs_teacher(cfg.model):
        overrides.append(f"model.teacher_ckpt={teacher_for(name, cfg, disk)}")
    train_here(overrides, tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for k, v in ckpt["state_dict"].items() if k.startswith("net."))
    assert list((tmp_path / "samples").glob("final_*.png"))


def test_two_processes_split_the_global_batch(disk, tmp_path):
    """ImageNet 64 CT (class-conditional, LPIPS) with 2 CPU processes: the global batch of 4 is 2 per process."""
    cfg = composed("experiment=imagenet64_ct")
    proc = run_script(
        "train.py",
        "experiment=imagenet64_ct",
        *shrink(cfg, disk),
        "trainer.devices=2",
        "callbacks.sample_grid.num=1",
        f"hydra.run.dir={tmp_path}",
    )
    ckpt = torch.load(Path(tmp_path) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
