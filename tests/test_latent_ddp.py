"""DDP on a latent cache (cm_lightning/latent/): two CPU processes read disjoint rows of the one cache that
prepare_data encoded, which together are the rows one process reads for the same global batch, and take the
same optimiser step as that process."""

import numpy as np
import torch
from helpers import TINY
from helpers.scenarios import two_ranks_and_one

LATENT_ICT = [
    "experiment=digits_latent_ict",
    *TINY,
    "trainer.accelerator=cpu",
    "trainer.deterministic=true",
    "logger=csv",
    "callbacks.metrics.every_n_steps=null",
    "callbacks.metrics.at_end=false",
    "+callbacks.rows._target_=helpers.probes.BatchRows",
    # Rows are told apart by their bytes, so the cache must hold the training latents themselves: a constant
    # scaling (the digits VAE's own, EDM2's way, draws a posterior sample at every read).
    "autoencoder.scaling._target_=cm_lightning.latent.scaling.ConstantScaling",
    "~autoencoder.scaling.raw_mean",
    "~autoencoder.scaling.raw_std",
    "~autoencoder.scaling.final_std",
    "+autoencoder.scaling.factor=0.2",
]


def cache_index(folder) -> dict[bytes, int]:
    """Each cached latent (view 0: the digits cache stores no mirrors) by its bytes -> its row number."""
    rows = np.concatenate([np.load(p)[0] for p in sorted(folder.glob("rows_*.npy"))])
    index = {row.tobytes(): i for i, row in enumerate(rows)}
    assert len(index) == len(rows) == 1797  # every row tells itself apart, so a match names one row
    return index


def rows_read(run_dir, rank: int, index: dict[bytes, int]) -> list[int]:
    batch = torch.load(run_dir / f"batch_rows_{rank}.pt", weights_only=True)
    return [index[row.numpy().tobytes()] for row in batch]


def test_two_ranks_read_disjoint_latent_rows_and_take_the_single_process_step(tmp_path):
    cache = tmp_path / "cache"
    two_ranks_and_one([*LATENT_ICT, f"data.cache_dir={cache}"], tmp_path)  # asserts the equal step
    index = cache_index(cache)
    first, second = (rows_read(tmp_path / "ddp", rank, index) for rank in (0, 1))
    single = rows_read(tmp_path / "single", 0, index)
    assert len(first) == len(second) == 8 and not set(first) & set(second)
    assert first + second == single  # rank r reads the r-th slice of the one process's global batch
