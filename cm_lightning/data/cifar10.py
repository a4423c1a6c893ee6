"""CIFAR-10 in torchvision's on-disk format (``cifar-10-batches-py``)."""

from pathlib import Path

import torch
from torch.utils.data import TensorDataset
from torchvision.datasets import CIFAR10

from cm_lightning.data.base import ImageDataModule
from cm_lightning.errors import ConfigError


class CIFAR10DataModule(ImageDataModule):
    num_classes = 10
    supported_channels = (3,)

    def __init__(self, root: str, download: bool = False, image_size: int = 32, hflip: bool = True, **kwargs):
        super().__init__(image_size=image_size, hflip=hflip, **kwargs)
        if image_size != 32:
            raise ConfigError(f"data.image_size={image_size}: CIFAR-10 images are 32x32; set data.image_size=32")
        self.root, self.download = Path(root).expanduser(), download
        if not download and not (self.root / CIFAR10.base_folder).is_dir():
            raise ConfigError(
                f"CIFAR-10 not found under data.root={self.root} (expected {self.root / CIFAR10.base_folder}); "
                "point data.root at it or set data.download=true to fetch it"
            )

    def prepare_data(self):
        if self.download:
            CIFAR10(self.root, train=True, download=True)

    def build_dataset(self):
        ds = CIFAR10(self.root, train=True, download=False)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 127.5 - 1
        return TensorDataset(x, torch.tensor(ds.targets, dtype=torch.long))
