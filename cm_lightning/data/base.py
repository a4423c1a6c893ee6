"""What every dataset here shares: a global batch size split over devices, a fixed validation
subset, images in [-1, 1] as (C, H, W) float tensors with integer labels."""

import abc

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from cm_lightning.errors import ConfigError


class HFlip(Dataset):
    """Random horizontal flip on top of any (image, label) dataset."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), y


class ImageDataModule(L.LightningDataModule, abc.ABC):
    num_classes = 0
    supported_channels: tuple[int, ...] = (1, 3)

    def __init__(self, image_size: int, channels: int = 3, batch_size: int = 128, num_workers: int = 0,
                 hflip: bool = False, val_size: int = 256):
        super().__init__()
        if channels not in self.supported_channels:
            raise ConfigError(
                f"data.channels={channels} is not available for {type(self).__name__}; "
                f"use one of {list(self.supported_channels)}"
            )
        self.channels, self.image_size, self.batch_size = channels, image_size, batch_size
        self.num_workers, self.hflip, self.val_size = num_workers, hflip, val_size
        self.dataset: Dataset | None = None

    @abc.abstractmethod
    def build_dataset(self) -> Dataset:
        """The whole training set of (image in [-1, 1], label) pairs."""

    def per_device_batch(self) -> int:
        """``batch_size`` is the global batch: devices x nodes x gradient accumulation must divide it."""
        if self.trainer is None:
            return self.batch_size
        parts = self.trainer.world_size * self.trainer.accumulate_grad_batches
        if self.batch_size % parts:
            raise ConfigError(
                f"data.batch_size={self.batch_size} (the global batch) is not divisible by devices x nodes x "
                f"accumulate_grad_batches = {parts}; choose a multiple of {parts}"
            )
        return self.batch_size // parts

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = self.build_dataset()

    def _loader(self, dataset, shuffle: bool, drop_last: bool):
        return DataLoader(dataset, batch_size=self.per_device_batch(), shuffle=shuffle, drop_last=drop_last,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        data = HFlip(self.dataset) if self.hflip else self.dataset
        return self._loader(data, shuffle=True, drop_last=True)

    def val_dataloader(self):
        n = min(self.val_size, len(self.dataset))
        return self._loader(Subset(self.dataset, range(n)), shuffle=False, drop_last=False)
