"""Editing a latent model (cm_lightning/latent/editing.py): the pixel mask on the latent grid is the max-pool rule
(a cell is kept only if every pixel it covers is known), Algorithm 4 keeps the known latent cells exactly and
nothing of the hole reaches them, and every evaluate task on a tiny latent checkpoint either writes its outputs
or refuses in one line."""

import itertools

import pytest
import torch
from helpers import TINY
from helpers.launch import evaluate_here, fails, run_script
from PIL import Image
from torchvision.utils import save_image

from cm_lightning.checkpoint import META_KEY
from cm_lightning.data.digits import digits_tensor
from cm_lightning.errors import ConfigError
from cm_lightning.latent.editing import covered, inpaint, latent_mask
from cm_lightning.loading import read_checkpoint, sampler_from, sampler_from_checkpoint
from cm_lightning.tasks.editing_inputs import box_mask, random_stroke_mask

LATENT_ICT = [
    "experiment=digits_latent_ict",
    *TINY,
    "trainer.accelerator=cpu",
    "logger=csv",
    # measured once at the end, so that task=report has a latent run's metrics.json to read
    "callbacks.metrics.every_n_steps=4",
    "callbacks.metrics.num=20",
    "callbacks.metrics.batch_size=20",
    "callbacks.metrics.reference_num=40",
]
WORKING = ["sample", "fid", "search_midpoint", "export", "inpaint", "stroke", "interpolate"]
REFUSING = ["colorize", "superres", "denoise"]  # their pixel operations have no latent counterpart


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """A 4-step digits_latent_ict run (4x4x4 latents of the shipped digits VAE) and a folder of 3 digits."""
    root = tmp_path_factory.mktemp("latent_editing")
    run_script("train.py", *LATENT_ICT, f"data.cache_dir={root / 'cache'}", f"hydra.run.dir={root / 'run'}")
    (root / "inputs").mkdir()
    for i, image in enumerate(digits_tensor(16)[0][:3]):
        save_image((image + 1) / 2, root / "inputs" / f"d{i}.png")
    return root


def masks() -> torch.Tensor:
    """Holes that cover latent cells partly: random strokes, an off-grid box and single pixels."""
    g = torch.Generator().manual_seed(0)
    strokes = [random_stroke_mask(16, g) for _ in range(4)]
    off_grid = box_mask(16).roll((1, 2), (-2, -1))
    dots = (torch.rand(3, 1, 16, 16, generator=g) < 0.03).float()
    return torch.cat([torch.stack(strokes), off_grid[None], dots, torch.zeros(1, 1, 16, 16)])


def test_the_latent_mask_keeps_a_cell_only_if_every_pixel_it_covers_is_known():
    omega = masks()
    cells = latent_mask(omega, 4)
    assert cells.shape == (omega.shape[0], 1, 4, 4)
    for n, i, j in itertools.product(range(omega.shape[0]), range(4), range(4)):
        block = omega[n, 0, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
        assert cells[n, 0, i, j] == float(block.any()), (n, i, j)
    assert (covered(cells, 4) >= omega).all() and 0 < cells[:-1].mean() < 1 and not cells[-1].any()


def test_latent_inpainting_keeps_the_known_cells_exactly_and_never_reads_the_hole(latent_run):
    path = latent_run / "run/checkpoints/last.ckpt"
    ckpt = read_checkpoint(path, "ckpt")
    sampler = sampler_from(ckpt, path)
    vae = sampler.decoder
    assert ckpt[META_KEY]["config"]["data"]["autoencoder"] and vae.factor == 4
    omega = masks()
    y = digits_tensor(16)[0][: omega.shape[0]]

    def edit(y):
        f = lambda x, s: sampler.denoise(x, s)  # noqa: E731
        return inpaint(f, vae, y, omega, [80.0, 3.99], sampler.parameterisation, torch.Generator().manual_seed(1))

    reference, cells, edited = edit(y)
    assert torch.equal(cells, latent_mask(omega, 4))
    keep = (1 - cells).bool().expand_as(edited)
    assert torch.equal(edited[keep], reference[keep])  # Algorithm 4's guarantee, on the latent grid
    assert reference[keep].abs().max() > 1  # the reference is on the latents' scale, not clamped to pixels' [-1, 1]
    assert not torch.equal(edited[~keep], reference[~keep])  # the hole was generated
    scribbled = y + omega * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    assert torch.equal(edit(scribbled)[2], edited)  # the hole's pixels reach nothing, as in pixel Algorithm 4


def test_every_evaluate_task_on_a_latent_checkpoint_works_or_refuses_in_one_line(latent_run):
    ckpt, out = latent_run / "run/checkpoints/last.ckpt", latent_run / "eval"
    common = [f"ckpt={ckpt}", "num=10", "batch_size=10", f"input={latent_run / 'inputs'}", "mask=random_strokes"]
    scoring = ["metrics.reference_num=40", "search_budget=40", "ts_num_scales=5"]
    sweep = [f"hydra.sweep.dir={out}", "hydra.sweep.subdir=${task}"]
    run_script("evaluate.py", "-m", f"task={','.join(WORKING)}", *common, *scoring, *sweep)
    assert (out / "sample/samples_1step.png").is_file() and (out / "fid/metrics.json").is_file()
    assert (out / "search_midpoint/search_midpoint.json").is_file() and (out / "export/model_ema.pt").is_file()
    for task in ("inpaint", "stroke"):  # pixel images, as a pixel model's edits: input | kept | result
        results = sorted((out / task / task).glob("*.png"))
        assert [p.stem for p in results] == ["d0", "d1", "d2"] and (out / task / f"{task}.png").is_file()
        assert all(Image.open(p).size == (16, 16) for p in results)
    frames = sorted((out / "interpolate/interpolate").glob("frame_*.png"))
    assert len(frames) == 10 and Image.open(frames[0]).size == (16, 16)
    run_script("evaluate.py", "task=report", f"runs=[{latent_run / 'run'}]", f"hydra.run.dir={out / 'report'}")
    assert (out / "report/report.html").is_file()
    for task in REFUSING:
        with pytest.raises(ConfigError, match=f"task={task} cannot edit .* a latent model") as refused:
            evaluate_here([f"task={task}", *common], out / task)
        assert "\n" not in str(refused.value) and not (out / task).exists()
    stderr = fails("evaluate.py", "task=denoise", *common, f"hydra.run.dir={out / 'cli'}")
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [stderr.strip().splitlines()[-1]]
    assert stderr.strip().splitlines()[-1].startswith("error: task=denoise cannot edit")


def test_a_latent_checkpoint_samples_pixels_whichever_way_it_is_loaded(latent_run):
    # The benchmarks load with sampler_from_checkpoint, the tasks with sampler_from: both decode.
    images, _ = sampler_from_checkpoint(latent_run / "run/checkpoints/last.ckpt")(3, steps=1)
    assert images.shape == (3, 1, 16, 16)
