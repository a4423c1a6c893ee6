"""The embedded default: scikit-learn's 1,797 handwritten 8x8 digits, no download needed."""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from cm_lightning.data.base import ImageDataModule


def digits_tensor(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as (N, 1, S, S) floats in [-1, 1] (pixel values 0..16, bilinear resize) and their labels."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1), torch.tensor(digits.target, dtype=torch.long)


class DigitsDataModule(ImageDataModule):
    num_classes = 10
    supported_channels = (1,)

    def __init__(self, image_size: int = 16, channels: int = 1, **kwargs):
        super().__init__(image_size=image_size, channels=channels, **kwargs)

    def build_dataset(self):
        return TensorDataset(*digits_tensor(self.image_size))
