"""Any folder of images; class sub-folders, when present, become labels."""

import logging
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from cm_lightning.data.base import ImageDataModule
from cm_lightning.data.transforms import CROPS, decode_problem, to_model_range
from cm_lightning.errors import ConfigError

log = logging.getLogger(__name__)
EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


class ImageFiles(Dataset):
    """Image files cropped square by ``crop`` (``transforms.CROPS``: a plain resize and centre crop, or ADM's)."""

    def __init__(self, files: list[Path], labels: list[int], size: int, channels: int, crop: str = "resize"):
        self.files, self.labels, self.size, self.channels = files, labels, size, channels
        self.crop = CROPS[crop]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as img:
            x = to_model_range(self.crop(img.convert("L" if self.channels == 1 else "RGB"), self.size), self.channels)
        return x, torch.tensor(self.labels[i])


def scan(root: Path, class_folders: bool) -> tuple[list[Path], list[int], int]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS)
    if not class_folders:
        return files, [0] * len(files), 0
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    index = {c: i for i, c in enumerate(classes)}
    files = [p for p in files if len(p.relative_to(root).parts) > 1]
    return files, [index[p.relative_to(root).parts[0]] for p in files], len(classes)


def usable(files: list[Path], labels: list[int]) -> tuple[list[Path], list[int]]:
    """The files that decode to an image within the decompression-bomb limit (the header checked before any
    pixel is decoded); the others are skipped with a warning naming them, before training rather than in a
    data-loader worker mid-run."""
    problems = [decode_problem(f) for f in files]
    for file, problem in zip(files, problems):
        if problem:
            log.warning("skipping %s: %s", file, problem)
    kept = [i for i, problem in enumerate(problems) if problem is None]
    return [files[i] for i in kept], [labels[i] for i in kept]


class ImageFolderDataModule(ImageDataModule):
    """``crop``: ``resize`` (short side resized, centre crop) or ``adm`` (ADM's ``center_crop_arr``, as the CM, DiT
    and EDM2 authors prepare ImageNet)."""

    def __init__(
        self, root: str, image_size: int, channels: int = 3, class_folders: bool = False, crop: str = "resize", **kwargs
    ):
        super().__init__(image_size=image_size, channels=channels, **kwargs)
        if crop not in CROPS:
            raise ConfigError(f"data.crop={crop!r} is unknown; use one of {', '.join(CROPS)}")
        self.crop = crop
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ConfigError(f"data.root={self.root} is not a directory; point data.root at a folder of images")
        self.files, self.labels, self.num_classes = scan(self.root, class_folders)
        self.files, self.labels = usable(self.files, self.labels)
        if not self.files:
            raise ConfigError(f"data.root={self.root} holds no images ({', '.join(sorted(EXTENSIONS))})")

    def build_dataset(self):
        return ImageFiles(self.files, self.labels, self.image_size, self.channels, self.crop)
