"""LSUN 256x256 (Bedroom, Cat, ...), unconditional, as distributed or as an exported image folder.

1. The LMDB of the LSUN release (e.g. ``bedroom_train_lmdb/`` with ``data.mdb``): keys are image ids,
   values the encoded images (WebP for the scene categories, also JPEG). The keys are listed once at
   start-up; each DataLoader worker opens its own read-only environment.
2. A folder of images exported from it (any depth).

Both are cropped as the CM and ADM authors did (``adm_center_crop``), so a model sees the same pixels
whichever form the data is in.
"""

import io
from pathlib import Path

import lmdb
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, get_worker_info

from cm_lightning.data.base import ImageDataModule
from cm_lightning.data.image_folder import ImageFiles, scan
from cm_lightning.data.transforms import adm_center_crop, to_model_range
from cm_lightning.errors import ConfigError


def decode(value: bytes, size: int) -> torch.Tensor:
    with Image.open(io.BytesIO(value)) as img:
        return to_model_range(adm_center_crop(img.convert("RGB"), size), 3)


def open_env(root: Path) -> lmdb.Environment:
    return lmdb.open(str(root), readonly=True, lock=False, readahead=False, meminit=False)


_WORKER_ENVS: dict[str, lmdb.Environment] = {}


def read_value(root: Path, key: bytes) -> bytes:
    """One value of the database. LMDB allows one open environment per database and process, and a forked
    child inherits that record: so the main process opens and closes the database around each read, and
    each DataLoader worker keeps its own environment open."""
    if get_worker_info() is None:
        with open_env(root) as env, env.begin(write=False) as txn:
            return txn.get(key)
    if str(root) not in _WORKER_ENVS:
        _WORKER_ENVS[str(root)] = open_env(root)
    with _WORKER_ENVS[str(root)].begin(write=False) as txn:
        return txn.get(key)


class LMDBImages(Dataset):
    def __init__(self, root: Path, keys: np.ndarray, size: int):
        self.root, self.keys, self.size = root, keys, size

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return decode(read_value(self.root, bytes(self.keys[i])), self.size), torch.tensor(0)


def list_lsun_keys(root: Path) -> np.ndarray:
    """All keys of an LSUN LMDB; stops with a clear message when the database does not hold images."""
    with open_env(root) as env, env.begin(write=False) as txn:
        cursor = txn.cursor()
        if not cursor.first():
            raise ConfigError(f"data.root={root} is an empty LMDB; point data.root at an LSUN *_lmdb folder")
        key, value = cursor.item()
        try:
            with Image.open(io.BytesIO(value)) as img:
                img.verify()
        except (UnidentifiedImageError, OSError):
            raise ConfigError(
                f"data.root={root} is an LMDB but not LSUN: the value of its first key {bytes(key)[:40]!r} is "
                f"not an image (it starts with {bytes(value)[:12]!r}); LSUN's LMDBs map image ids to WebP or "
                "JPEG bytes, e.g. bedroom_train_lmdb from the LSUN release"
            ) from None
        keys = list(txn.cursor().iternext(keys=True, values=False))
    # Fixed-width bytes (LSUN's keys are ASCII ids): compact, and cheap to hand to worker processes.
    return np.array(keys)


class LSUNDataModule(ImageDataModule):
    supported_channels = (3,)

    def __init__(self, root: str, image_size: int = 256, **kwargs):
        super().__init__(image_size=image_size, **kwargs)
        self.root = Path(root).expanduser()
        if self.root.suffix == ".zip":
            raise ConfigError(
                f"data.root={self.root} is the zip of the release; unzip it and point data.root "
                "at the *_lmdb folder inside"
            )
        if not self.root.is_dir():
            raise ConfigError(
                f"data.root={self.root} is not a directory; point it at an LSUN *_lmdb folder "
                "(with data.mdb) or at a folder of images exported from it"
            )
        self.keys = list_lsun_keys(self.root) if (self.root / "data.mdb").is_file() else None
        if self.keys is None:
            self.files = scan(self.root, class_folders=False)[0]
            if not self.files:
                raise ConfigError(f"data.root={self.root} has neither data.mdb (LSUN's LMDB) nor images")

    def build_dataset(self):
        if self.keys is not None:
            return LMDBImages(self.root, self.keys, self.image_size)
        return ImageFiles(self.files, [0] * len(self.files), self.image_size, self.channels, crop="adm")
