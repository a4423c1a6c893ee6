"""The authors' checkpoint format: plain state dicts of the ADM U-Net load as teachers (model.teacher_ckpt=)
and samplers (evaluate.py ckpt= net=), mismatches name the differing keys and shapes, and our runs export
to the same format (evaluate.py task=export)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY
from helpers.builders import randomise
from helpers.launch import evaluate_here, run_script, train_here
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cm_lightning.diffusion.precond import consistency_function, edm_denoiser
from cm_lightning.errors import ConfigError
from cm_lightning.loading import (
    META_KEY,
    export_state_dict,
    kind_from_name,
    load_teacher,
    net_hint,
    read_checkpoint,
    sampler_from_checkpoint,
    state_dict_mismatch,
)
from cm_lightning.nets.ncsnpp import NCSNpp
from cm_lightning.sampler import Sampler
from cm_lightning.tasks.common import authors_uint8
from cm_lightning.tasks.sample import class_labels

LAYOUT = json.loads((Path(__file__).parent / "data" / "adm-state-dict-layout.json").read_text())
NET = dict(
    _target_="cm_lightning.nets.adm.ADMUNet",
    image_size=8,
    in_channels=3,
    model_channels=16,
    channel_mult=[1, 2],
    num_res_blocks=1,
    attention_resolutions=[4],
    num_head_channels=16,
    num_classes=3,
)
NET_CLI = [
    "net=adm_tiny",
    "net.image_size=8",
    "net.in_channels=3",
    "net.model_channels=16",
    "net.channel_mult=[1,2]",
    "net.attention_resolutions=[4]",
    "net.num_head_channels=16",
    "net.num_classes=3",
]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def save_plain(path: Path, **changes) -> dict:
    torch.manual_seed(0)
    state = randomise(instantiate({**NET, **changes})).state_dict()
    torch.save(state, path)
    return state


@pytest.mark.parametrize("name,config", [("imagenet64_cond", "adm_imagenet64"), ("lsun256_uncond", "adm_lsun256")])
def test_published_net_configs_take_the_released_files_without_renaming(name, config):
    with torch.device("meta"):
        net = instantiate(OmegaConf.load(ROOT / "conf" / "net" / f"{config}.yaml"))
        released = {k: torch.empty(shape) for k, shape in LAYOUT[name]["keys"]}
    assert state_dict_mismatch(net.state_dict(), released) == []
    net.load_state_dict(released, assign=True)  # strict: every key of the listing, no renaming


def test_another_architecture_names_the_first_differing_keys(tmp_path):
    with torch.device("meta"):
        imagenet = instantiate(OmegaConf.load(ROOT / "conf" / "net" / "adm_imagenet64.yaml")).state_dict()
        lsun = {k: torch.empty(shape) for k, shape in LAYOUT["lsun256_uncond"]["keys"]}
    diff = state_dict_mismatch(imagenet, lsun)
    assert diff[:3] == [
        "missing label_emb.weight (1000, 768)",
        "unexpected input_blocks.7.0.skip_connection.weight (512, 256, 1, 1)",
        "time_embed.0.weight: expected (768, 192), got (1024, 256)",
    ]
    assert diff[-1] == "in all 83 missing, 108 unexpected, 457 of another shape"

    torch.save(
        NCSNpp(
            image_size=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,)
        ).state_dict(),
        tmp_path / "cd_other.pt",
    )
    with pytest.raises(
        ConfigError,
        match=r"ckpt=.*cd_other.pt does not match the configured network: "
        r"missing time_embed.0.weight \(64, 16\);.*unexpected map_noise.freqs",
    ):
        sampler_from_checkpoint(tmp_path / "cd_other.pt", net=NET)
    save_plain(tmp_path / "cd_wide.pt", model_channels=32)
    with pytest.raises(ConfigError, match=r"time_embed.0.weight: expected \(64, 16\), got \(128, 32\)"):
        sampler_from_checkpoint(tmp_path / "cd_wide.pt", net=NET)


def test_names_kinds_and_missing_information(tmp_path):
    assert kind_from_name("edm_imagenet64_ema.pt") == "edm"
    assert kind_from_name("/x/cd_bedroom256_lpips.pt") == kind_from_name("ct_cat256.pt") == "consistency"
    assert kind_from_name("model.pt") is None
    assert net_hint("cd_imagenet64_l2.pt") == "net=adm_imagenet64"
    assert net_hint("ct_bedroom256.pt") == net_hint("edm_cat256_ema.pt") == "net=adm_lsun256"

    save_plain(tmp_path / "cd_imagenet64_l2.pt")
    with pytest.raises(ConfigError, match="plain state dict .*name its network: net=adm_imagenet64"):
        sampler_from_checkpoint(tmp_path / "cd_imagenet64_l2.pt")
    with pytest.raises(ConfigError, match="one set of weights; drop ema="):
        sampler_from_checkpoint(tmp_path / "cd_imagenet64_l2.pt", ema=1, net=NET)
    save_plain(tmp_path / "model.pt")
    with pytest.raises(ConfigError, match="add kind=consistency .* or kind=edm"):
        sampler_from_checkpoint(tmp_path / "model.pt", net=NET)
    assert sampler_from_checkpoint(tmp_path / "model.pt", net=NET, kind="edm").parameterisation == edm_denoiser()
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="neither a cm-lightning checkpoint .* nor a plain state dict"):
        sampler_from_checkpoint(tmp_path / "list.pt", net=NET)


def test_plain_teacher_loads_into_a_copy_of_the_runs_net(tmp_path):
    state = save_plain(tmp_path / "edm_tiny_ema.pt")
    student = instantiate(NET)
    teacher = load_teacher(tmp_path / "edm_tiny_ema.pt", like=student)
    assert teacher.net is not student and teacher.parameterisation.eps == 0.0 and not teacher.net.training
    assert teacher.parameterisation.noise_kind == student.noise_kind == "adm"  # the net config's conditioning
    for k, v in teacher.net.state_dict().items():
        assert torch.equal(v, state[k])
    torch.save(state, tmp_path / "cd_tiny.pt")
    with pytest.raises(ConfigError, match="named as a consistency model; the teacher must be an EDM model"):
        load_teacher(tmp_path / "cd_tiny.pt", like=student)


def test_evaluate_samples_a_plain_state_dict(tmp_path):
    state = save_plain(tmp_path / "cd_tiny.pt")
    run_script(
        "evaluate.py",
        f"ckpt={tmp_path / 'cd_tiny.pt'}",
        "task=sample",
        *NET_CLI,
        "num=4",
        "steps=[1]",
        "classes=[2,0]",
        "device=cpu",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    out = np.load(tmp_path / "eval" / "samples_1step.npz")
    assert out["arr_0"].shape == (4, 8, 8, 3) and out["arr_1"].tolist() == [2, 0, 2, 0]
    # The same images as the authors' parameterisation around the same weights: f(x, sigma) with eps = 0.002
    # and the ADM noise conditioning 1000 * 0.25 ln(sigma).
    net = instantiate(NET)
    net.load_state_dict(state)
    images, _ = Sampler(net.eval(), consistency_function(0.5, 0.002, "adm"))(
        4, steps=1, labels=torch.tensor([2, 0, 2, 0]), seed=0
    )
    assert np.array_equal(out["arr_0"], authors_uint8(images))


def fake_run_checkpoint(path: Path) -> dict:
    """A checkpoint as train.py wrote it before parameterisations were stored by name (``kind``, ``precond``
    and ``grid``; see GenerativeModule.on_save_checkpoint for today's), with two EMAs: it still loads."""
    nets = [randomise(instantiate(NET)) for _ in range(3)]
    state = {
        f"{prefix}.{k}": v for prefix, net in zip(("net", "ema.0", "ema.1"), nets) for k, v in net.state_dict().items()
    }
    meta = {
        "config": {"model": {"net": NET}},
        "kind": "consistency",
        "precond": {"sigma_data": 0.5, "eps": 0.002, "noise_kind": "adm"},
        "ema_rates": [0.9, 0.99],
        "sample_ema": 0,
        "grid": dict(sigma_min=0.002, sigma_max=80.0, rho=7.0),
    }
    torch.save({"state_dict": state, META_KEY: meta}, path)
    return nets[2].state_dict()


def test_export_writes_the_authors_format(tmp_path):
    ema1 = fake_run_checkpoint(tmp_path / "last.ckpt")
    evaluate_here(
        ["task=export", f"ckpt={tmp_path / 'last.ckpt'}", "ema=1", f"export_to={tmp_path / 'cd_tiny.pt'}"],
        tmp_path / "eval",
    )
    exported = torch.load(tmp_path / "cd_tiny.pt", weights_only=True)
    assert list(exported) == list(ema1) and all(torch.equal(exported[k], ema1[k]) for k in ema1)
    ours = sampler_from_checkpoint(tmp_path / "last.ckpt", ema=1)
    plain = sampler_from_checkpoint(tmp_path / "cd_tiny.pt", net=NET)
    assert torch.equal(ours(3, steps=2, seed=1)[0], plain(3, steps=2, seed=1)[0])
    with pytest.raises(ConfigError, match="already a plain state dict"):
        export_state_dict(read_checkpoint(tmp_path / "cd_tiny.pt"), tmp_path / "cd_tiny.pt", tmp_path / "again.pt")


def test_cd_from_a_plain_teacher_file(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=digits_cd", *TINY])
    torch.manual_seed(0)
    torch.save(randomise(instantiate(cfg.net)).state_dict(), tmp_path / "edm_digits_ema.pt")
    train_here(
        [
            "experiment=digits_cd",
            f"model.teacher_ckpt={tmp_path / 'edm_digits_ema.pt'}",
            *TINY,
            "trainer.max_steps=2",
            "logger=none",
        ],
        tmp_path / "cd",
    )
    ckpt = torch.load(tmp_path / "cd" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt[META_KEY]["config"]["model"]["teacher_ckpt"].endswith("edm_digits_ema.pt")


def test_given_classes_must_suit_the_model(tmp_path):
    save_plain(tmp_path / "cd_tiny.pt")
    conditional = sampler_from_checkpoint(tmp_path / "cd_tiny.pt", net=NET)
    assert class_labels([1, 2], 5, conditional).tolist() == [1, 2, 1, 2, 1]
    assert class_labels(None, 5, conditional) is None  # random classes, drawn from the seed
    with pytest.raises(ConfigError, match=r"classes=\[3\] must be class indices in 0..2"):
        class_labels([3], 2, conditional)
    save_plain(tmp_path / "ct_uncond.pt", num_classes=0)
    with pytest.raises(ConfigError, match="drop classes= for an unconditional one"):
        class_labels([0], 2, sampler_from_checkpoint(tmp_path / "ct_uncond.pt", net={**NET, "num_classes": 0}))
