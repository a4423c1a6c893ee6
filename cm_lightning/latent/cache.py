"""A latent cache: a dataset encoded once into fixed-size shards ``rows_<k>.npy`` (and ``labels_<k>.npy``)
beside a ``manifest.json`` that says how it was made, then read memory-mapped.

Each shard is written to a temporary file and moved into place with ``os.replace``, so a shard on disk is
always complete: a killed encode (or a full disk) leaves whole shards only, and the next run encodes the
missing ones. Shard k's posterior samples are drawn from a generator seeded by (seed, k), so a resumed cache
is bit-equal to one encoded without interruption."""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cm_lightning.errors import ConfigError

MANIFEST = "manifest.json"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two nodes encoding one cache never share a temp file
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_manifest(folder: Path, manifest: dict) -> None:
    """A cache made with another VAE, scaling, resolution or source is refused rather than trained on."""
    path = folder / MANIFEST
    if not path.is_file():
        return
    stored = json.loads(path.read_text())
    for key in manifest.keys() - {"vae"}:  # the weights' digest names the VAE wherever its folder moved
        if stored.get(key) != manifest[key]:
            raise ConfigError(
                f"data.cache_dir={folder} was made with {key}={stored.get(key)!r}, not {manifest[key]!r}; "
                "point data.cache_dir at another folder (or delete this one to re-encode)"
            )


def build(folder: Path, images: Dataset, autoencoder, manifest: dict, flips: bool, shard_size: int, seed: int):
    """Encode every missing shard of ``images`` (and its horizontal flips); return the number encoded."""
    folder.mkdir(parents=True, exist_ok=True)
    check_manifest(folder, manifest)
    tmp = folder / f"{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)
    n = len(images)
    todo = [k for k in range(-(-n // shard_size)) if not (folder / f"rows_{k:05d}.npy").is_file()]
    start, done = time.monotonic(), 0
    for k in todo:
        items = [images[i] for i in range(k * shard_size, min(n, (k + 1) * shard_size))]
        x = torch.stack([item[0] for item in items])
        views = [x, x.flip(-1)] if flips else [x]
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        rows = torch.stack([autoencoder.encode(v, g) for v in views])
        _save_atomic(folder / f"labels_{k:05d}.npy", np.asarray([int(item[1]) for item in items], np.int64))
        _save_atomic(folder / f"rows_{k:05d}.npy", rows.numpy().astype(np.float32))
        done += len(items)
        rate = done / max(time.monotonic() - start, 1e-9)
        left = sum(min(shard_size, n - j * shard_size) for j in todo) - done
        print(
            f"\rencoding latents: {done}/{n} images, {rate:.1f} images/s, {left / rate:.0f} s left",
            end="",
            file=sys.stderr,
            flush=True,
        )
    if todo:
        print(file=sys.stderr)
    return len(todo)


class LatentRows(Dataset):
    """The cache as (stored row, label) pairs, memory-mapped; with flips, index i + n is item i mirrored
    (the ``EpochSampler``'s mirror convention)."""

    def __init__(self, folder: Path, scaling, seed: int = 0):
        self.folder, self.scaling, self.seed = Path(folder), scaling, seed
        names = sorted(self.folder.glob("rows_*.npy"))
        self.rows = [np.load(p, mmap_mode="r") for p in names]
        self.labels = np.concatenate([np.load(p.with_name(p.name.replace("rows", "labels"))) for p in names])
        self.shard = self.rows[0].shape[1]
        self.n = len(self.labels)
        self.views = self.rows[0].shape[0]
        self.reads = 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        view, j = divmod(int(i), self.n)
        row = torch.from_numpy(np.array(self.rows[j // self.shard][min(view, self.views - 1), j % self.shard]))
        # EDM2 draws a fresh posterior sample at every read: seeded by (seed, index, read) so runs repeat.
        self.reads += 1
        g = torch.Generator().manual_seed(hash((self.seed, int(i), self.reads)) & (2**62))
        return self.scaling.read(row, g), torch.tensor(int(self.labels[j]))
