"""``task=<edit> ckpt=PATH input=FILE_OR_FOLDER``: zero-shot editing of your images.

Tasks (CM paper, Section 6; the math is in cm_lightning/diffusion/editing.py):
    inpaint      Algorithm 4 with A = I; ``mask=`` box | left_half | random_strokes | a PNG (white = generate)
    colorize     Algorithm 4 with the per-pixel luminance basis; needs a 3-channel model
    superres     Algorithm 4 with the per-patch mean basis; ``factor=`` must divide the resolution
    stroke       SDEdit: the stroke painting noised to ``sigma``, then f
    denoise      the input plus noise of ``sigma`` (or, with noisy_input=true, already noisy), then f
    interpolate  ``num`` one-step samples along the great circle between two seeded noises
A latent model (one whose checkpoint names a VAE) edits on its latent grid where the edit has a latent meaning:
inpaint (the mask max-pooled to the grid), stroke (the painting encoded) and interpolate (latent noises), each
decoded (cm_lightning/latent/editing.py); colorize, superres and denoise refuse it in one line (LATENT_REFUSALS).
Each writes ``<task>.png`` (rows of input | degraded | result; interpolate: one row of frames) and the
results as ``<task>/<name>.png`` under out_dir.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchvision.utils import make_grid, save_image

from cm_lightning.checkpoint import META_KEY, upgrade
from cm_lightning.diffusion import editing
from cm_lightning.diffusion.linear_transforms import LUMINANCE, ChannelBasis, Identity, PatchBasis
from cm_lightning.errors import ConfigError
from cm_lightning.latent import editing as latent_editing
from cm_lightning.loading import is_plain, read_once
from cm_lightning.metrics.sharding import seeded_chunks
from cm_lightning.sampler import Sampler
from cm_lightning.tasks.common import load_sampler, pick_device
from cm_lightning.tasks.editing_inputs import build_masks, read_images, to_tensor

log = logging.getLogger(__name__)

DEFAULT_SIGMA = {"stroke": 2.0, "denoise": 0.5}  # noise levels where a digit's shape survives

# Why a latent model cannot take these edits: each acts on pixels in a way no operation on latents reproduces.
PIXEL_LINEAR = "is a linear map of pixels, and a VAE's latents have no linear counterpart of it to keep"
LATENT_REFUSALS = {
    "colorize": f"its luminance basis {PIXEL_LINEAR}",
    "superres": f"its patch-mean basis {PIXEL_LINEAR}",
    "denoise": "its noise is in pixels, and a VAE's encoding of a noisy image is not a latent plus noise of a "
    "known level, which f needs",
}


@dataclass
class Editor:
    """A consistency checkpoint and the settings every editing task shares."""

    sampler: Sampler
    levels: list[float]  # Algorithm 4's noise levels, the parameterisation's own
    device: torch.device
    seed: int
    batch_size: int
    label: int | None

    def batched(self, fn, *tensors):
        """``fn(f, generator, *batch)`` over batches; returns its outputs concatenated, on the CPU."""
        outputs = []
        for start, size, chunk_seed in seeded_chunks(tensors[0].shape[0], self.batch_size, self.seed):
            batch = [t[start : start + size].to(self.device) for t in tensors]
            g = torch.Generator(device=self.device).manual_seed(chunk_seed)
            f = self.bound(batch[0].shape[0], g)
            outputs.append([o.cpu() for o in fn(f, g, *batch)])
        return [torch.cat(parts) for parts in zip(*outputs)]

    @property
    def vae(self):
        """The checkpoint's autoencoder on the device; None for a pixel model."""
        return None if self.sampler.decoder is None else self.sampler.decoder.to(self.device)

    def bound(self, num: int, g: torch.Generator):
        """f(x, sigma) with class labels bound: ``label`` if given, else drawn from the seed."""
        labels = self.sampler.labels(num, g)
        if labels is not None and self.label is not None:
            labels = torch.full_like(labels, self.label)
        return lambda x, s: self.sampler.denoise(x, s, labels)


def run_method(ckpt: dict) -> tuple[str, int] | None:
    """('cd' or 'ct', the grid size N at the end of training; 0 without a discrete grid) of the run that
    wrote the checkpoint ``ckpt``, as its objective stated them (``checkpoint.upgrade`` for older files);
    every consistency-training variant counts as 'ct'. None for a method without a pair rule (sCM)."""
    facts = upgrade(ckpt[META_KEY])["method"]
    return None if facts is None else (facts["family"], facts["num_scales"])


def edit_levels(edit_sigmas, ckpt, parameterisation) -> list[float]:
    """Algorithm 4's levels in the parameterisation's own terms: ``edit_sigmas`` (EDM sigmas) if given, else the
    published two-step setting of the method of the run that wrote ``ckpt`` (as read), else the
    parameterisation's two-step levels (sCM)."""
    if edit_sigmas is not None:
        sigmas = editing.check_decreasing(
            edit_sigmas, "edit_sigmas", parameterisation.grid["sigma_min"], parameterisation.grid["sigma_max"]
        )
        return [parameterisation.from_sigma(s) for s in sigmas]
    method = run_method(ckpt)
    if method is None:
        return parameterisation.levels(2)
    return [parameterisation.from_sigma(s) for s in editing.published_edit_sigmas(*method, **parameterisation.grid)]


def load_editor(cfg: DictConfig, task: str) -> Editor:
    ckpt = read_once(cfg.ckpt)
    if is_plain(ckpt):
        raise ConfigError(
            f"task={task} reads a checkpoint written by train.py, whose config names its method; "
            f"ckpt={cfg.ckpt} is a plain state dict"
        )
    device = pick_device(cfg.device)
    sampler = load_sampler(cfg, device)
    parameterisation = sampler.parameterisation
    if sampler.decoder is not None and task in LATENT_REFUSALS:
        raise ConfigError(
            f"task={task} cannot edit ckpt={cfg.ckpt}, a latent model (it samples a VAE's latents): "
            f"{LATENT_REFUSALS[task]}; latent models edit with task=inpaint, stroke or interpolate"
        )
    if not parameterisation.few_step:
        raise ConfigError(
            f"task={task} needs a consistency model (CD, CT, sCM, ...); ckpt={cfg.ckpt} is an EDM teacher"
        )
    levels = edit_levels(cfg.edit_sigmas, ckpt, parameterisation)
    if cfg.label is not None and not 0 <= cfg.label < max(sampler.num_classes, 1):
        raise ConfigError(
            f"label={cfg.label} is not a class of this model ({sampler.num_classes} classes); "
            "leave label=null for an unconditional model"
        )
    return Editor(sampler, levels, device, cfg.seed, cfg.batch_size, cfg.label)


def edit_sigma(cfg: DictConfig, task: str, sampler: Sampler) -> float:
    sigma = DEFAULT_SIGMA[task] if cfg.sigma is None else float(cfg.sigma)
    low, high = sampler.parameterisation.grid["sigma_min"], sampler.parameterisation.grid["sigma_max"]
    if not low <= sigma <= high:
        raise ConfigError(
            f"sigma={sigma} is outside the model's noise range [{low}, {high}]; choose a level "
            f"inside it, e.g. sigma={DEFAULT_SIGMA[task]}"
        )
    return sigma


# --- outputs ----------------------------------------------------------------------------------
def write_results(cfg: DictConfig, task: str, names: list[str], columns: list[torch.Tensor]) -> list[Path]:
    """``<task>.png``: one row per image of ``columns`` (input | degraded | result); the results alone
    as ``<task>/<name>.png``."""
    out = Path(cfg.out_dir)
    (out / task).mkdir(parents=True, exist_ok=True)
    rows = torch.stack(columns, dim=1).flatten(0, 1)
    grid_path = out / f"{task}.png"
    save_image(make_grid((rows.clamp(-1, 1) + 1) / 2, nrow=len(columns), padding=1, pad_value=1), grid_path)
    written, seen = [grid_path], set()
    for i, (name, image) in enumerate(zip(names, columns[-1])):
        name = f"{name}_{i}" if name in seen else name  # a.png and a.jpg in one folder
        seen.add(name)
        written.append(out / task / f"{name}.png")
        save_image((image.clamp(-1, 1) + 1) / 2, written[-1])
    log.info("wrote %s and %d result(s) under %s", grid_path, len(names), out / task)
    return written


# --- tasks ------------------------------------------------------------------------------------
def algorithm4_task(cfg: DictConfig, task: str, transform, omega_for, editor: Editor, images) -> list[Path]:
    """Runs Algorithm 4 on ``input=`` with the mask ``omega_for(shape)``: columns input | kept | result."""
    y = to_tensor(images, editor.sampler)
    omega = omega_for(y.shape)

    def run(f, g, y, omega):
        kept = editing.degrade(y, transform, omega)
        return kept, editing.edit(f, y, transform, omega, editor.levels, editor.sampler.parameterisation, g)

    kept, result = editor.batched(run, y, omega.expand(y.shape[0], *omega.shape[1:]))
    if task == "colorize":  # show the luminance as gray, not the luminance axis' tint
        kept = (torch.tensor(LUMINANCE)[:, None, None] * y).sum(1, keepdim=True).expand_as(y)
    return write_results(cfg, task, [n for n, _ in images], [y, kept, result])


def inpaint_task(cfg: DictConfig) -> list[Path]:
    editor = load_editor(cfg, "inpaint")
    images = read_images(cfg, "inpaint")
    masks = build_masks(cfg, images, editor.sampler.pixel_shape[-1])
    if editor.vae is None:
        return algorithm4_task(cfg, "inpaint", Identity(), lambda shape: masks, editor, images)
    return latent_inpaint_task(cfg, editor, images, masks)


def latent_inpaint_task(cfg: DictConfig, editor: Editor, images, masks: torch.Tensor) -> list[Path]:
    """Algorithm 4 on the latent grid (latent/editing.py), decoded: columns input | the pixels of the kept
    latent cells | result."""
    y, vae = to_tensor(images, editor.sampler), editor.vae

    def run(f, g, y, omega):
        _, cells, edited = latent_editing.inpaint(f, vae, y, omega, editor.levels, editor.sampler.parameterisation, g)
        return y * (1 - latent_editing.covered(cells, vae.factor)), vae.decode(edited)

    kept, result = editor.batched(run, y, masks)
    return write_results(cfg, "inpaint", [n for n, _ in images], [y, kept, result])


def colorize_task(cfg: DictConfig) -> list[Path]:
    editor = load_editor(cfg, "colorize")
    channels = editor.sampler.image_shape[0]
    if channels != 3:
        raise ConfigError(
            f"task=colorize needs a colour (3-channel) model, but ckpt={cfg.ckpt} has {channels} channel(s). "
            "Train one on the colour digits with `python train.py experiment=digits_colour_ct` "
            "(or any RGB data, e.g. data=cifar10)"
        )
    basis = ChannelBasis(LUMINANCE)
    return algorithm4_task(cfg, "colorize", basis, basis.keep_first, editor, read_images(cfg, "colorize"))


def superres_task(cfg: DictConfig) -> list[Path]:
    editor = load_editor(cfg, "superres")
    size = editor.sampler.image_shape[-1]
    if cfg.factor < 2 or size % cfg.factor:
        divisors = [k for k in range(2, size + 1) if size % k == 0]
        raise ConfigError(f"factor={cfg.factor} does not divide the model's resolution {size}; use one of {divisors}")
    basis = PatchBasis(cfg.factor)
    return algorithm4_task(cfg, "superres", basis, basis.keep_first, editor, read_images(cfg, "superres"))


def stroke_task(cfg: DictConfig) -> list[Path]:
    editor = load_editor(cfg, "stroke")
    sigma = edit_sigma(cfg, "stroke", editor.sampler)
    images = read_images(cfg, "stroke")
    strokes, vae, parameterisation = to_tensor(images, editor.sampler), editor.vae, editor.sampler.parameterisation

    def run(f, g, y):
        if vae is None:
            noise = torch.randn(y.shape, generator=g, device=y.device)
            return y + sigma * noise, editing.stroke_guided(
                f, y, noise, [parameterisation.from_sigma(sigma)], parameterisation, g
            )
        noise = torch.randn((y.shape[0], *editor.sampler.image_shape), generator=g, device=y.device)
        z, edited = latent_editing.stroke_guided(
            f, vae, y, noise, [parameterisation.from_sigma(sigma)], parameterisation, g
        )
        return vae.decode(z + sigma * noise), vae.decode(edited)

    noisy, result = editor.batched(run, strokes)
    return write_results(cfg, "stroke", [n for n, _ in images], [strokes, noisy, result])


def denoise_task(cfg: DictConfig) -> list[Path]:
    editor = load_editor(cfg, "denoise")
    sigma = edit_sigma(cfg, "denoise", editor.sampler)
    images = read_images(cfg, "denoise")
    clean = to_tensor(images, editor.sampler)

    def run(f, g, y):
        noisy = y if cfg.noisy_input else y + sigma * torch.randn(y.shape, generator=g, device=y.device)
        return noisy, editing.denoise(f, noisy, sigma, editor.sampler.parameterisation)

    noisy, result = editor.batched(run, clean)
    return write_results(cfg, "denoise", [n for n, _ in images], [clean, noisy, result])


def interpolate_task(cfg: DictConfig) -> list[Path]:
    editor = load_editor(cfg, "interpolate")
    shape = editor.sampler.image_shape
    g = torch.Generator(device=editor.device).manual_seed(cfg.seed)
    z0, z1 = torch.randn((2, *shape), generator=g, device=editor.device)
    f, latent = editor.bound(cfg.num, g), editor.vae is not None  # a latent model's noises are latents
    frames = editing.interpolate(f, z0, z1, cfg.num, editor.sampler.parameterisation, clip=not latent)
    return write_frames(cfg, editor.sampler.pixels(frames).cpu())


def write_frames(cfg: DictConfig, frames: torch.Tensor) -> list[Path]:
    out = Path(cfg.out_dir)
    (out / "interpolate").mkdir(parents=True, exist_ok=True)
    strip = out / "interpolate.png"
    save_image(make_grid((frames + 1) / 2, nrow=frames.shape[0], padding=1, pad_value=1), strip)
    paths = [out / "interpolate" / f"frame_{i:03d}.png" for i in range(frames.shape[0])]
    for path, frame in zip(paths, frames):
        save_image((frame + 1) / 2, path)
    log.info("wrote %s and %d frames under %s", strip, len(paths), out / "interpolate")
    return [strip, *paths]


EDIT_TASKS = {
    "inpaint": inpaint_task,
    "colorize": colorize_task,
    "superres": superres_task,
    "stroke": stroke_task,
    "denoise": denoise_task,
    "interpolate": interpolate_task,
}
