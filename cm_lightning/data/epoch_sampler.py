"""The order in which training samples are drawn: a function of (seed, epoch) that every rank computes,
cut into global batches of which each rank takes its slice, and resumable at any batch of an epoch.

Epoch ``e`` is a permutation of the dataset drawn from a generator seeded by (seed, e); with
``mirror`` each sample also gets a horizontal-flip bit from the same generator, passed on as index
``i + n`` (see ``data.base.HFlip``). The permutation is cut into global batches of
``batch_size x world_size`` indices and rank r reads the r-th ``batch_size`` of each, so one process
with the whole global batch sees exactly the samples that the ranks see together, in the same rows.
``resume`` continues a pass after the batches a resumed run has already trained on.
"""

import torch
from torch.utils.data import DistributedSampler

from cm_lightning.runtime import seeding


class EpochSampler(DistributedSampler):
    """A ``DistributedSampler`` (so that Lightning keeps it rather than injecting its own) whose
    epochs are global-batch aligned, independent of the rank count, and resumable mid-epoch."""

    def __init__(
        self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, mirror: bool = False
    ):
        self.n, self.batch_size, self.seed, self.mirror = num_samples, batch_size, seed, mirror
        self.rank, self.num_replicas = rank, world_size
        self.epoch = 0
        self.batches_per_epoch = num_samples // (batch_size * world_size)
        self.consumed = 0  # batches of this rank trained on in the current pass

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this as each of its epochs starts; the data order keeps its own count of passes and
        moves on only when the last one was read to its end. Lightning records a run that stopped at max_steps
        mid-epoch as a finished epoch, so resuming it to train longer would otherwise skip the rest of the pass
        (and a shortened Lightning epoch, limit_train_batches, would never see the rest of it)."""
        if self.consumed >= self.batches_per_epoch:
            self.epoch, self.consumed = self.epoch + 1, 0

    def resume(self, epoch: int, batches: int) -> None:
        """Continue pass ``epoch`` after its first ``batches`` batches."""
        self.epoch, self.consumed = epoch, min(batches, self.batches_per_epoch)

    def epoch_order(self) -> torch.Tensor:
        g = seeding.generator("cpu", self.seed, self.epoch, 11)
        order = torch.randperm(self.n, generator=g)
        if self.mirror:
            order = order + self.n * torch.randint(0, 2, (self.n,), generator=g)
        return order

    def __iter__(self):
        order = self.epoch_order()
        b, world = self.batch_size, self.num_replicas
        for j in range(self.consumed, self.batches_per_epoch):
            first = (j * world + self.rank) * b
            yield from order[first : first + b].tolist()

    def __len__(self) -> int:
        """Samples of a whole epoch on this rank; Lightning counts a resumed epoch's batches from its own
        restored progress, so the length must not shrink when the first batches are skipped."""
        return self.batches_per_epoch * self.batch_size
