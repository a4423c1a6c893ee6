"""The order in which training samples are drawn: a function of (seed, epoch) that every rank computes,
cut into global batches of which each rank takes its slice, and resumable at any batch of an epoch.

Epoch ``e`` is a permutation of the dataset drawn from a generator seeded by (seed, e); with
``mirror`` each sample also gets a horizontal-flip bit from the same generator, passed on as index
``i + n`` (see ``data.base.HFlip``). The permutation is cut into global batches of
``batch_size x world_size`` indices and rank r reads the r-th ``batch_size`` of each, so one process
with the whole global batch sees exactly the samples that the ranks see together, in the same rows.
``skip`` starts the next pass after the batches a resumed run has already trained on.
"""

import torch
from torch.utils.data import DistributedSampler

from cm_lightning.runtime import seeding


class EpochSampler(DistributedSampler):
    """A ``DistributedSampler`` (so that Lightning keeps it rather than injecting its own) whose
    epochs are global-batch aligned, independent of the rank count, and resumable mid-epoch."""

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 mirror: bool = False):
        self.n, self.batch_size, self.seed, self.mirror = num_samples, batch_size, seed, mirror
        self.rank, self.num_replicas = rank, world_size
        self.epoch = 0
        self.batches_per_epoch = num_samples // (batch_size * world_size)
        self.consumed = 0  # batches of this rank trained on in the current epoch
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a new epoch starts at its first batch, whatever was skipped in the last one
            self.epoch, self.consumed, self._skip = epoch, 0, 0

    def skip(self, batches: int) -> None:
        """The next pass over epoch ``self.epoch`` starts after ``batches`` batches."""
        self.consumed = self._skip = batches

    def epoch_order(self) -> torch.Tensor:
        g = seeding.generator("cpu", self.seed, self.epoch, 11)
        order = torch.randperm(self.n, generator=g)
        if self.mirror:
            order = order + self.n * torch.randint(0, 2, (self.n,), generator=g)
        return order

    def __iter__(self):
        order = self.epoch_order()
        b, world = self.batch_size, self.num_replicas
        start, self._skip = self._skip, 0
        for j in range(start, self.batches_per_epoch):
            first = (j * world + self.rank) * b
            yield from order[first : first + b].tolist()

    def __len__(self) -> int:
        """Samples of a whole epoch on this rank; Lightning counts a resumed epoch's batches from its own
        restored progress, so the length must not shrink when the first batches are skipped."""
        return self.batches_per_epoch * self.batch_size
