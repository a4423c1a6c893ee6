"""Tiny datasets written in the layouts the real ones are released in, for the data modules' tests and the
experiments' one-step runs."""

import hashlib
import io
import pickle

import lmdb
import numpy as np
from PIL import Image


def write_cifar_fixture(root, n=20):
    """A tiny CIFAR-10 in torchvision's pickled layout (cifar-10-batches-py)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "labels": [int(v) for v in rng.integers(0, 10, n)],
        }
        with open(base / name, "wb") as f:
            pickle.dump(batch, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def write_imagenet_batches(root, size=16, n=6, batches=2, first_label=1, seed=0):
    """Downsampled-ImageNet batches as released: data (N, 3*S*S) uint8 channel-major, 1-based labels, mean."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for b in range(1, batches + 1):
        data = rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8)
        labels = [first_label, first_label + 999]  # both ends of the range, then random
        labels += [int(v) for v in rng.integers(first_label, first_label + 1000, n - 2)]
        np.savez(root / f"train_data_batch_{b}.npz", data=data, labels=labels, mean=data.mean(axis=0))
    return root


def random_image(rng, width, height) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_lsun_lmdb(path, n=6, formats=("webp", "jpeg"), seed=0):
    """An LMDB as LSUN distributes it: 40-character hex ids -> encoded images of varying size."""
    rng = np.random.default_rng(seed)
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i in range(n):
            buf = io.BytesIO()
            random_image(rng, 24 + 4 * i, 20 + 2 * i).save(buf, format=formats[i % len(formats)])
            txn.put(hashlib.sha1(str(i).encode()).hexdigest().encode(), buf.getvalue())
    env.close()
    return path
