"""The embedded default: scikit-learn's 1,797 handwritten 8x8 digits, no download needed, in grayscale
or (``colour=True``) drawn with a random foreground and background colour per digit, so that
colourisation can be trained and shown offline."""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from cm_lightning.data.base import ImageDataModule
from cm_lightning.errors import ConfigError


def digits_tensor(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as (N, 1, S, S) floats in [-1, 1] (pixel values 0..16, bilinear resize) and their labels."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1), torch.tensor(digits.target, dtype=torch.long)


def _luminance(rgb: torch.Tensor) -> torch.Tensor:
    return rgb @ torch.tensor([0.2989, 0.5870, 0.1140])


def colour_pairs(num: int, generator: torch.Generator, min_contrast: float = 0.4):
    """``num`` (foreground, background) RGB colours in [0, 1] whose luminances differ by at least
    ``min_contrast``, so that the digit stays visible in the luminance that colourisation keeps."""
    fg, bg = torch.rand(num, 3, generator=generator), torch.rand(num, 3, generator=generator)
    while (bad := (_luminance(fg) - _luminance(bg)).abs() < min_contrast).any():
        n = int(bad.sum())
        fg[bad], bg[bad] = torch.rand(n, 3, generator=generator), torch.rand(n, 3, generator=generator)
    return fg, bg


def colour_digits_tensor(image_size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as (N, 3, S, S) in [-1, 1]: ink intensity a blends background (a = 0) into foreground (a = 1)."""
    x, y = digits_tensor(image_size)
    ink = (x + 1) / 2
    fg, bg = colour_pairs(x.shape[0], torch.Generator().manual_seed(seed))
    rgb = bg[:, :, None, None] * (1 - ink) + fg[:, :, None, None] * ink
    return rgb * 2 - 1, y


class DigitsDataModule(ImageDataModule):
    num_classes = 10
    supported_channels = (1,)

    def __init__(self, image_size: int = 16, channels: int = 1, colour: bool = False, colour_seed: int = 0, **kwargs):
        if colour and channels != 3:
            raise ConfigError(
                f"data.colour=true draws RGB digits but data.channels={channels}; set data.channels=3 "
                "(or use data=digits_colour)"
            )
        if channels == 3 and not colour:
            raise ConfigError("data.channels=3 needs the colour digits: set data.colour=true (data=digits_colour)")
        self.supported_channels = (3,) if colour else (1,)
        self.colour, self.colour_seed = colour, colour_seed
        super().__init__(image_size=image_size, channels=channels, **kwargs)

    def build_dataset(self):
        if self.colour:
            return TensorDataset(*colour_digits_tensor(self.image_size, self.colour_seed))
        return TensorDataset(*digits_tensor(self.image_size))
