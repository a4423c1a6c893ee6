"""Inputs of the editing tasks: the user's images (a file or a folder) and inpainting masks."""

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, ImageDraw

from cm_lightning.data.transforms import center_crop_resize, decode_problem, to_model_range
from cm_lightning.errors import ConfigError
from cm_lightning.sampler import Sampler

log = logging.getLogger(__name__)


def read_images(cfg: DictConfig, task: str) -> list[tuple[str, Image.Image]]:
    """(name, image) for ``input=``: one file or every file of a folder; unreadable files are skipped
    with a warning naming them."""
    if cfg.input is None:
        raise ConfigError(
            f"task={task} needs input=<an image file or a folder of images>, e.g. input=docs/editing/digits"
        )
    path = Path(str(cfg.input)).expanduser()
    if not path.exists():
        raise ConfigError(f"input={cfg.input} does not exist; pass an image file or a folder of images")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    images = []
    for file in files:
        problem = decode_problem(file)
        if problem is None:
            try:
                with Image.open(file) as img:
                    img.load()
                    images.append((file.stem, img.copy()))
            except (OSError, ValueError) as exc:  # a header that promises pixels the file does not hold
                problem = f"not a readable image ({exc})"
        if problem:
            log.warning("skipping %s: %s", file, problem)
    if not images:
        raise ConfigError(f"input={cfg.input} holds no readable image (tried {len(files)} file(s))")
    return images


def to_tensor(images: list[tuple[str, Image.Image]], sampler: Sampler) -> torch.Tensor:
    """The images at the resolution of the model's samples (a latent model's: its decoder's pixels), in [-1, 1]."""
    channels, _, size = sampler.pixel_shape
    return torch.stack([to_model_range(center_crop_resize(img.convert("RGB"), size), channels) for _, img in images])


def box_mask(size: int) -> torch.Tensor:
    m = torch.zeros(1, size, size)
    m[:, size // 4 : size // 4 + size // 2, size // 4 : size // 4 + size // 2] = 1
    return m


def left_half_mask(size: int) -> torch.Tensor:
    m = torch.zeros(1, size, size)
    m[..., : size // 2] = 1
    return m


def random_stroke_mask(size: int, generator: torch.Generator, strokes: int = 3, segments: int = 4) -> torch.Tensor:
    """Free-form strokes: random walks of thick line segments (seeded)."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(strokes):
        points = torch.randint(0, size, (1, 2), generator=generator)
        steps = torch.randint(-size // 3, size // 3 + 1, (segments, 2), generator=generator)
        path = torch.cat([points, points + steps.cumsum(0)]).clamp(0, size - 1)
        draw.line([tuple(p) for p in path.tolist()], fill=255, width=max(1, size // 6))
    return (torch.from_numpy(np.array(img)) > 127).float()[None]


def fit_mask(mask: Image.Image, path: Path, img: Image.Image, name: str, size: int) -> torch.Tensor:
    """A mask drawn at the image's size (cropped and resized like the image) or at the model's."""
    if mask.size == img.size:
        mask = center_crop_resize(mask, size)
    elif mask.size != (size, size):
        raise ConfigError(
            f"mask={path} is {mask.size[0]}x{mask.size[1]} but image {name} is {img.size[0]}x"
            f"{img.size[1]} (model resolution {size}x{size}); draw the mask at the image's size or at "
            f"{size}x{size}"
        )
    return (to_model_range(mask, 1) > 0).float()


def build_masks(cfg: DictConfig, images: list[tuple[str, Image.Image]], size: int) -> torch.Tensor:
    """Omega (N, 1, S, S), 1 = to generate."""
    if cfg.mask == "box":
        return box_mask(size).expand(len(images), 1, size, size)
    if cfg.mask == "left_half":
        return left_half_mask(size).expand(len(images), 1, size, size)
    if cfg.mask == "random_strokes":
        g = torch.Generator().manual_seed(cfg.seed)
        return torch.stack([random_stroke_mask(size, g) for _ in images])
    path = Path(str(cfg.mask)).expanduser()
    if not path.is_file():
        raise ConfigError(f"mask={cfg.mask} is neither box, left_half, random_strokes nor an image file")
    problem = decode_problem(path)
    try:
        if problem is None:
            with Image.open(path) as m:
                mask = m.convert("L")
    except OSError as exc:
        problem = f"not a readable image ({exc})"
    if problem:
        raise ConfigError(f"mask={cfg.mask} is {problem}; use box, left_half, random_strokes or another image")
    return torch.stack([fit_mask(mask, path, img, name, size) for name, img in images])
