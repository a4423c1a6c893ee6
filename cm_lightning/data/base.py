"""What every dataset here shares: a global batch size split over devices, a training order that is a
function of (seed, epoch) and resumes at the exact batch (``data/epoch_sampler.py``), a fixed validation
subset, images in [-1, 1] as (C, H, W) float tensors with integer labels."""

import abc
import warnings

import lightning as L
from torch.utils.data import DataLoader, Dataset, Subset

from cm_lightning.data.epoch_sampler import EpochSampler
from cm_lightning.errors import ConfigError

# Lightning warns at every mid-epoch resume unless the DataLoader object itself is stateful; here the data
# module saves and restores the position (state_dict below), so the warning is wrong.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


class HFlip(Dataset):
    """Horizontal flips on top of any (image, label) dataset of n items: index i + n is item i mirrored.
    The sampler draws the flips, so that they too are a function of (seed, epoch) and resume exactly."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        n = len(self.base)
        x, y = self.base[i % n]
        return (x.flip(-1) if i >= n else x), y


class ImageDataModule(L.LightningDataModule, abc.ABC):
    num_classes = 0
    supported_channels: tuple[int, ...] = (1, 3)

    def __init__(
        self,
        image_size: int,
        channels: int = 3,
        batch_size: int = 128,
        num_workers: int = 0,
        hflip: bool = False,
        val_size: int = 256,
        seed: int = 0,
    ):
        super().__init__()
        if channels not in self.supported_channels:
            raise ConfigError(
                f"data.channels={channels} is not available for {type(self).__name__}; "
                f"use one of {list(self.supported_channels)}"
            )
        self.channels, self.image_size, self.batch_size = channels, image_size, batch_size
        self.num_workers, self.hflip, self.val_size, self.seed = num_workers, hflip, val_size, seed
        self.dataset: Dataset | None = None
        self.sampler: EpochSampler | None = None
        self._resume: dict | None = None

    @abc.abstractmethod
    def build_dataset(self) -> Dataset:
        """The whole training set of (image in [-1, 1], label) pairs."""

    def per_device_batch(self, world_size: int | None = None, accumulate: int | None = None) -> int:
        """``batch_size`` is the global batch: devices x nodes x gradient accumulation must divide it."""
        if world_size is None:
            if self.trainer is None:
                return self.batch_size
            world_size, accumulate = self.trainer.world_size, self.trainer.accumulate_grad_batches
        parts = world_size * (accumulate or 1)
        if self.batch_size % parts:
            raise ConfigError(
                f"data.batch_size={self.batch_size} (the global batch) is not divisible by devices x nodes x "
                f"accumulate_grad_batches = {parts}; choose a multiple of {parts}"
            )
        return self.batch_size // parts

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = self.build_dataset()

    def _loader(self, dataset, **kwargs):
        return DataLoader(
            dataset,
            batch_size=self.per_device_batch(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self):
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.sampler = EpochSampler(
            len(self.dataset), self.per_device_batch(), self.seed, rank, world, mirror=self.hflip
        )
        if self._resume:
            self.sampler.resume(self._resume["epoch"], self._resume["samples"] // (self.sampler.batch_size * world))
            self._resume = None
        data = self.mirrored(self.dataset) if self.hflip else self.dataset
        return self._loader(data, sampler=self.sampler, drop_last=True)

    def mirrored(self, dataset: Dataset) -> Dataset:
        """The dataset with index i + n the mirror of item i (the sampler draws the flips)."""
        return HFlip(dataset)

    def val_dataloader(self):
        n = min(self.val_size, len(self.dataset))
        return self._loader(Subset(self.dataset, range(n)), shuffle=False, drop_last=False)

    # --- the data position, saved in every checkpoint -----------------------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training and self.sampler is not None:
            self.sampler.consumed += 1  # a batch the training loop takes, not one a worker prefetched
        return batch

    def state_dict(self) -> dict:
        """The epoch and the samples of the global batch already trained on in it: independent of the
        rank count, so a run resumes at the same sample with another number of devices."""
        if self.sampler is None:
            return {}
        world = self.sampler.num_replicas
        return {"epoch": self.sampler.epoch, "samples": self.sampler.consumed * self.sampler.batch_size * world}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state or None  # applied when the training loader is built, after the restore
