"""ImageNet 64x64, class-conditional (1,000 classes), in either of the forms people have on disk.

1. Downsampled ImageNet (Chrabaszcz et al. 2017): ``train_data_batch_1.npz`` ... ``train_data_batch_10.npz``,
   each with ``data``, an (N, 3 * S * S) uint8 array stored channel-major (all red values of an image, then
   green, then blue; S = 64 for the 64x64 release), and ``labels``, N class numbers that are 1-based
   (1 ... 1000) in the official files, hence ``label_offset: 1``. Their class numbers follow the devkit's
   ``map_clsloc.txt``, not the sorted synset order of ADM's image folders (and of the authors' released
   class-conditional checkpoints); give ``class_map`` = that file to renumber the labels in sorted-synset order.
2. An image folder with one sub-folder per class (e.g. ILSVRC ``train/n01440764/...``), read by the
   image_folder module: classes numbered in sorted folder order, images resized and centre-cropped.

Every batch file is checked when the data module is built (keys, shape, labels), so a wrong file stops
before training. The pixel arrays are loaded at setup and kept as uint8 (about 15.7 GB for the full set).
"""

import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cm_lightning.data.base import ImageDataModule
from cm_lightning.data.image_folder import ImageFiles, scan
from cm_lightning.errors import ConfigError

BATCH_GLOB = "train_data_batch_*.npz"


class UInt8Images(Dataset):
    """(N, C, H, W) uint8 images kept as bytes, mapped to [-1, 1] one at a time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].float() / 127.5 - 1, self.labels[i]


def batch_files(root: Path) -> list[Path]:
    """The batch files in numeric order (batch_10 after batch_9)."""
    number = lambda p: int(re.findall(r"\d+", p.stem)[-1])  # noqa: E731
    return sorted(root.glob(BATCH_GLOB), key=number)


def npy_shape(archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array in an .npz, read from its header without loading the array."""
    with archive.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def read_class_map(path: Path) -> np.ndarray:
    """``map_clsloc.txt`` lines "wnid number name" -> array taking a 1-based file label to its sorted-synset index."""
    if not path.is_file():
        raise ConfigError(f"data.class_map={path} does not exist; give the devkit's map_clsloc.txt or null")
    rows = [line.split()[:2] for line in path.read_text().splitlines() if line.strip()]
    order = {wnid: i for i, wnid in enumerate(sorted(wnid for wnid, _ in rows))}
    table = np.full(max(int(n) for _, n in rows) + 1, -1, dtype=np.int64)
    for wnid, number in rows:
        table[int(number)] = order[wnid]
    return table


class ImageNet64DataModule(ImageDataModule):
    supported_channels = (3,)

    def __init__(
        self,
        root: str,
        image_size: int = 64,
        num_classes: int = 1000,
        label_offset: int = 1,
        class_map: str | None = None,
        **kwargs,
    ):
        super().__init__(image_size=image_size, **kwargs)
        self.root, self.num_classes, self.label_offset = Path(root).expanduser(), num_classes, label_offset
        self.class_map = None if class_map is None else read_class_map(Path(class_map).expanduser())
        if not self.root.is_dir():
            raise ConfigError(
                f"data.root={self.root} is not a directory; point it at the folder holding "
                f"{BATCH_GLOB} (downsampled ImageNet) or one sub-folder of images per class"
            )
        self.files = batch_files(self.root)
        if self.files:
            self.labels = torch.cat([self._check_batch(f) for f in self.files])
        else:
            self.paths, labels, found = scan(self.root, class_folders=True)
            if not self.paths:
                raise ConfigError(
                    f"data.root={self.root} holds neither downsampled-ImageNet batches "
                    f"({BATCH_GLOB}) nor class sub-folders of images"
                )
            if found != num_classes:
                raise ConfigError(
                    f"data.root={self.root} has {found} class folders but data.num_classes="
                    f"{num_classes}; set data.num_classes={found} (and net.num_classes={found})"
                )
            self.labels = torch.tensor(labels)

    def _check_batch(self, path: Path) -> torch.Tensor:
        """Checks keys, dtype and shape of one batch file from its headers; returns its 0-based labels."""
        width = 3 * self.image_size**2
        try:
            with zipfile.ZipFile(path) as archive:
                keys = {Path(n).stem for n in archive.namelist()}
                if not {"data", "labels"} <= keys:
                    raise ConfigError(
                        f"{path} has arrays {sorted(keys)}; a downsampled-ImageNet batch holds "
                        "'data' (N x 3*S*S uint8) and 'labels'"
                    )
                shape, dtype = npy_shape(archive, "data")
        except zipfile.BadZipFile as exc:
            raise ConfigError(
                f"{path} is not an .npz archive ({exc}); use the npz release of downsampled ImageNet"
            ) from None
        if len(shape) != 2 or shape[1] != width or dtype != np.uint8:
            side = int(round((shape[-1] / 3) ** 0.5)) if len(shape) == 2 else "?"
            raise ConfigError(
                f"{path}: 'data' is {dtype} of shape {shape}, but data.image_size={self.image_size} needs uint8 "
                f"of shape (N, {width}) = 3 x {self.image_size} x {self.image_size} channel-major; this file "
                f"looks like {side}x{side} images, so set data.image_size={side} or use the 64x64 release"
            )
        raw = np.asarray(np.load(path)["labels"], dtype=np.int64).reshape(-1)
        if len(raw) != shape[0]:
            raise ConfigError(f"{path}: {len(raw)} labels for {shape[0]} images")
        if self.class_map is None:
            labels = raw - self.label_offset
        else:
            known = (raw >= 0) & (raw < len(self.class_map))
            labels = np.where(known, self.class_map[np.where(known, raw, 0)], -1)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            how = "data.class_map" if self.class_map is not None else f"data.label_offset={self.label_offset}"
            raise ConfigError(
                f"{path}: labels run from {raw.min()} to {raw.max()}, which with {how} does not fit "
                f"data.num_classes={self.num_classes} (0-based); the official files count from 1 (label_offset=1): "
                f"set data.label_offset or data.num_classes (and net.num_classes) to match the labels"
            )
        return torch.from_numpy(labels)

    def build_dataset(self):
        if not self.files:
            return ImageFiles(self.paths, self.labels.tolist(), self.image_size, self.channels)
        s = self.image_size
        images = [torch.from_numpy(np.load(f)["data"]).reshape(-1, 3, s, s) for f in self.files]
        return UInt8Images(torch.cat(images), self.labels)
