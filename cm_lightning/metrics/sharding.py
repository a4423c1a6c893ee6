"""Sampling for metrics split over the processes of a DDP run (Lightning's trainer or Fabric).

The ``num`` samples are cut into chunks of ``batch_size``; chunk ``c`` is drawn with seed
``seed + c`` (``seeded_chunks``, the one batch loop of sampling, metrics and editing), and each rank takes a
contiguous run of chunks.
So every rank draws its share with its own seeds, the total is exactly ``num`` for any world size,
and the samples themselves do not depend on the world size. Each rank extracts the features of its
share; rank 0 gathers them in chunk order.
"""

import torch
import torch.distributed as dist
from torchmetrics.utilities.distributed import gather_all_tensors
from tqdm import tqdm

from cm_lightning.metrics.fidelity import Fidelity, to_uint8


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seeded_chunks(num: int, batch_size: int, seed: int, chunks: range | None = None):
    """(start, size, seed + c) of each chunk c of ``num`` items in chunks of ``batch_size`` (``chunks``: a subset),
    so that what chunk c draws depends on neither the batch count before it nor the number of ranks."""
    for c in range(-(-num // batch_size)) if chunks is None else chunks:
        start = c * batch_size
        yield start, min(batch_size, num - start), seed + c


def shard_chunks(num: int, batch_size: int, rank: int, world: int) -> range:
    """This rank's chunk indices: a contiguous, balanced split of ceil(num / batch_size) chunks."""
    chunks = -(-num // batch_size)
    return range(rank * chunks // world, (rank + 1) * chunks // world)


def shard_batches(sampler, num: int, batch_size: int, seed: int, device, rank: int = 0, world: int = 1, **how):
    """This rank's chunks, one at a time, as uint8 N x C x H x W on ``device``."""
    for _, size, chunk_seed in seeded_chunks(num, batch_size, seed, shard_chunks(num, batch_size, rank, world)):
        images, _ = sampler(size, seed=chunk_seed, device=device, **how)
        yield to_uint8(images)


def progress(num: int, batch_size: int, rank: int, world: int, what: str) -> tqdm:
    """A bar in images/s over rank 0's share of the ``num`` images (the other ranks go at its pace); hidden on
    the other ranks."""
    share = sum(size for _, size, _ in seeded_chunks(num, batch_size, 0, shard_chunks(num, batch_size, 0, world)))
    suffix = f" (rank 0 of {world})" if world > 1 else ""
    return tqdm(total=share, unit="img", desc=what + suffix, disable=rank != 0, dynamic_ncols=True)


def sample_shard(sampler, num: int, batch_size: int, seed: int, device, rank: int = 0, world: int = 1, **how):
    """All of this rank's samples at once."""
    empty = torch.empty((0, *sampler.pixel_shape), dtype=torch.uint8, device=device)
    return torch.cat([empty, *shard_batches(sampler, num, batch_size, seed, device, rank, world, **how)])


def gather_rows(x: torch.Tensor) -> torch.Tensor | None:
    """Rows of every rank's ``x`` concatenated in rank order on rank 0 (None elsewhere).

    Ranks may hold different numbers of rows, none at all included (then any trailing shape): torchmetrics'
    ``gather_all_tensors`` pads to the largest shape and trims back.
    """
    rank, world = rank_and_world()
    if world == 1:
        return x
    parts = [p for p in gather_all_tensors(x) if p.shape[0]]
    return torch.cat(parts) if rank == 0 else None


def share(value):
    """Rank 0's value on every rank (a search must take the same branch everywhere)."""
    _, world = rank_and_world()
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def sharded_features(
    sampler, fidelity: Fidelity, num: int, batch_size: int, seed: int, device, **how
) -> dict[str, torch.Tensor] | None:
    """Features of ``num`` samples drawn over all ranks, on rank 0 (None on the others)."""
    rank, world = rank_and_world()
    parts = []
    with progress(num, batch_size, rank, world, "sampling + features") as bar:
        # Features chunk by chunk: only they are kept, never all the images (50,000 at 256x256 are 10 GB).
        for x in shard_batches(sampler, num, batch_size, seed, device, rank, world, **how):
            parts.append(fidelity.features(x, device))
            bar.update(len(x))
    gathered = {}
    for layer in fidelity.layers:
        # A rank without chunks has no features but still takes part in the gather, with no rows.
        mine = torch.cat([p[layer] for p in parts]) if parts else torch.empty(0, 0)
        rows = gather_rows(mine.to(device))
        gathered[layer] = None if rows is None else rows.cpu()
    return gathered if rank == 0 else None
