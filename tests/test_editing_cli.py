"""Zero-shot editing as a user runs it: `python evaluate.py task=<edit>` on checkpoints from tiny
training runs (a colour CT run here, the session's CD run for one channel), the properties of
Algorithm 4 on the trained colour model, and each kind of bad input."""

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY
from helpers.launch import run_script, train_here
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from PIL import Image
from torchvision.utils import save_image

from cm_lightning.cli import shared_sweep_options
from cm_lightning.data.digits import colour_digits_tensor
from cm_lightning.diffusion import editing
from cm_lightning.diffusion.linear_transforms import LUMINANCE, ChannelBasis, Identity, PatchBasis
from cm_lightning.errors import ConfigError
from cm_lightning.loading import read_checkpoint, sampler_from_checkpoint
from cm_lightning.runtime.speed import Speed
from cm_lightning.tasks.dispatch import evaluate
from cm_lightning.tasks.editing import run_method

TASKS = ["inpaint", "colorize", "superres", "stroke", "denoise", "interpolate"]
NAMES = ["d0", "d1", "d2"]


@pytest.fixture(scope="module")
def colour_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("colour")
    train_here(
        [
            "experiment=digits_colour_ct",
            *TINY,
            "trainer.max_steps=30",
            "trainer.val_check_interval=30",
            "model.objective.pair.curriculum.s1=150",
            "logger=none",
        ],
        out,
    )
    return out / "checkpoints/last.ckpt"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three colour digits, a file that is not an image, and a 16x16 mask (white = to generate)."""
    folder = tmp_path_factory.mktemp("inputs")
    images = colour_digits_tensor(16)[0][:3]
    for name, image in zip(NAMES, images):
        save_image((image + 1) / 2, folder / f"{name}.png")
    (folder / "broken.png").write_text("not an image")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 2:10] = 255
    Image.fromarray(mask).save(folder.parent / "mask.png")
    return folder


def read(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float()


def sweep(ckpt, tasks, out, *overrides, check=True):
    return run_script(
        "evaluate.py",
        "-m",
        f"task={','.join(tasks)}",
        f"ckpt={ckpt}",
        *overrides,
        f"hydra.sweep.dir={out}",
        "hydra.sweep.subdir=${task}",
        check=check,
    )


def test_every_task_on_a_colour_model(colour_ckpt, inputs, tmp_path):
    proc = sweep(colour_ckpt, TASKS, tmp_path, f"input={inputs}", f"mask={inputs.parent / 'mask.png'}", "num=4")
    assert f"skipping {inputs / 'broken.png'}" in proc.stdout + proc.stderr
    for task in TASKS[:-1]:
        assert Image.open(tmp_path / task / f"{task}.png").size == (3 * 17 + 1, 3 * 17 + 1)  # input|degraded|result
        assert sorted(p.stem for p in (tmp_path / task / task).glob("*.png")) == NAMES
    assert Image.open(tmp_path / "interpolate/interpolate.png").size == (4 * 17 + 1, 18)
    assert len(list((tmp_path / "interpolate/interpolate").glob("frame_*.png"))) == 4

    # what Algorithm 4 keeps survives the round trip through 8-bit files
    y = read(inputs / "d1.png")
    inpainted = read(tmp_path / "inpaint/inpaint/d1.png")
    keep = torch.from_numpy(np.array(Image.open(inputs.parent / "mask.png"))) < 128
    assert torch.equal(inpainted[:, keep], y[:, keep]) and not torch.equal(inpainted, y)
    means = torch.nn.functional.avg_pool2d
    assert (means(read(tmp_path / "superres/superres/d1.png"), 4) - means(y, 4)).abs().max() <= 1.0
    lum = torch.tensor(LUMINANCE)[:, None, None]
    assert ((read(tmp_path / "colorize/colorize/d1.png") * lum).sum(0) - (y * lum).sum(0)).abs().max() <= 1.5


def test_one_channel_model_and_colourisation_refused(cd_run, inputs, tmp_path):
    # the sweep runs in order, so colorize, last, fails only after the others have written their files
    tasks = ["inpaint", "superres", "stroke", "denoise", "interpolate", "colorize"]
    proc = sweep(
        cd_run / "checkpoints/last.ckpt",
        tasks,
        tmp_path,
        f"input={inputs / 'd0.png'}",
        "mask=random_strokes",
        "factor=8",
        "num=3",
        "sigma=1.5",
        "batch_size=1",
        check=False,
    )
    for task in tasks[:4]:
        assert Image.open(tmp_path / task / task / "d0.png").size == (16, 16)
    assert len(list((tmp_path / "interpolate/interpolate").glob("frame_*.png"))) == 3
    assert proc.returncode == 2 and not (tmp_path / "colorize/colorize.png").exists()
    assert "task=colorize needs a colour (3-channel) model" in proc.stderr
    assert "python train.py experiment=digits_colour_ct" in proc.stderr


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_trained_model_keeps_the_reference_exactly(colour_ckpt, precision):
    # bf16 is what editing samples in on a GPU (conf/evaluate/device.yaml speed.precision=auto): Algorithm 4's
    # recombination stays in fp32, so what it keeps is kept as exactly.
    sampler = sampler_from_checkpoint(colour_ckpt).speed_up(Speed(channels_last=True, compile=False), precision, "cpu")
    f = lambda x, s: sampler.denoise(x, s)  # noqa: E731
    y = colour_digits_tensor(16)[0][:6]
    box = torch.zeros(1, 1, 16, 16)
    box[..., 4:12, 4:12] = 1
    colour, patch = ChannelBasis(), PatchBasis(4)
    cases = [(Identity(), box), (colour, colour.keep_first(y.shape)), (patch, patch.keep_first(y.shape))]
    for transform, omega in cases:
        x = editing.edit(
            f, y, transform, omega, [80.0, 3.0, 0.5], sampler.parameterisation, torch.Generator().manual_seed(0)
        )
        assert torch.allclose(transform(x) * (1 - omega), transform(y) * (1 - omega), atol=1e-5)
    z0, z1 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    frames = editing.interpolate(f, z0, z1, 3, sampler.parameterisation)
    ends = f(
        sampler.parameterisation.t_max * torch.stack([z0, z1]), torch.full((2,), sampler.parameterisation.t_max)
    ).clamp(-1, 1)
    assert torch.allclose(frames[[0, -1]], ends, atol=1e-5)
    assert torch.equal(editing.denoise(f, y, sampler.parameterisation.t_min, sampler.parameterisation), y)


def test_default_edit_levels_are_read_from_the_run(colour_ckpt, cd_run):
    assert run_method(read_checkpoint(colour_ckpt)) == ("ct", 151)  # the CM curriculum ends at N(K) = s1 + 1
    assert run_method(read_checkpoint(cd_run / "checkpoints/last.ckpt")) == ("cd", 18)


def cfg(ckpt, tmp_path, *overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=[f"ckpt={ckpt}", f"out_dir={tmp_path}", "device=cpu", *overrides])


@pytest.mark.parametrize(
    "task,other",
    [
        ("fid", "mask=box"),
        ("inpaint", "metrics.fid=false"),
        ("sample", "runs=[x]"),
        ("report", "steps=[1]"),
        ("export", "input=x"),
    ],
)
def test_an_option_of_another_task_is_refused(task, other):
    with pytest.raises(ConfigCompositionException, match=f"Could not override '{other.split('=')[0]}'"):
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            compose("evaluate", overrides=[f"task={task}", other])


def test_a_sweep_over_tasks_shares_its_options():
    args = ["-m", "task=sample,inpaint", "num=4", "input=x", "mask=box", "steps=[1]", "nmu=3", "hydra.run.dir=y"]
    assert shared_sweep_options(args) == [*args[:3], "++input=x", "++mask=box", "++steps=[1]", *args[-2:]]
    assert shared_sweep_options(["task=fid", "input=x"]) == ["task=fid", "input=x"]  # refused by Hydra


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["task=inpaint", "mask=MASK10"], r"mask=.*mask10.png is 10x10 but image d0 is 16x16"),
        (["task=inpaint", "edit_sigmas=[1.0,5.0]"], r"edit_sigmas=\[1.0, 5.0\] must be .*strictly decreasing"),
        (
            ["task=superres", "factor=3"],
            r"factor=3 does not divide the model's resolution 16; use one of \[2, 4, 8, 16\]",
        ),
        (["task=stroke", "sigma=500"], r"sigma=500.0 is outside the model's noise range"),
        (["task=denoise", "input=BROKEN"], r"input=.*broken.png holds no readable image"),
        (["task=inpaint", "input=null"], r"task=inpaint needs input="),
        (["task=inpaint", "mask=circle"], r"mask=circle is neither box, left_half, random_strokes nor an image file"),
        (["task=inpaint", "mask=BROKEN"], r"mask=.*broken.png is not a readable image"),
    ],
)
def test_bad_input_stops_before_editing(colour_ckpt, inputs, tmp_path, overrides, message):
    mask10 = tmp_path / "mask10.png"
    Image.new("L", (10, 10), 255).save(mask10)
    overrides = [o.replace("MASK10", str(mask10)).replace("BROKEN", str(inputs / "broken.png")) for o in overrides]
    if not any(o.startswith("input=") for o in overrides):
        overrides.append(f"input={inputs}")
    with pytest.raises(ConfigError, match=message):
        evaluate(cfg(colour_ckpt, tmp_path / "out", *overrides))
    assert not (tmp_path / "out").exists()
