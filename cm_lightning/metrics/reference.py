"""Reference statistics: features and FID statistics of the real images, computed once and cached.

The reference is either a training set (a data module) or an ``.npz`` in the authors' format
(``arr_0``: uint8 N x H x W x C, e.g. their reference batches). Its features under the chosen
extractor are cached on disk in a file named by dataset, resolution, channels and extractor (with a
digest of its weights), so later runs and evaluations reuse them. ``ReferenceSource`` checks shapes
and counts before any sampling; ``load`` does the expensive part on the rank that computes metrics.
"""

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torch_fidelity.metric_fid import fid_features_to_statistics

from cm_lightning.errors import ConfigError
from cm_lightning.metrics.fidelity import Fidelity, to_uint8
from cm_lightning.runtime import atomic

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Next to torch-fidelity's own cache: $TORCH_HOME/fidelity_cache (~/.cache/torch/fidelity_cache)."""
    return Path(torch.hub._get_torch_home()) / "fidelity_cache"


@dataclass
class Reference:
    features: torch.Tensor  # N x D, the layer shared by FID, KID and precision/recall
    statistics: dict  # torch-fidelity's {"mu", "sigma"} of those features


def read_npz_images(path) -> np.ndarray:
    """The ``arr_0`` images of an authors'-format .npz, checked: uint8, N x H x W x C with C in {1, 3}."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"reference={path} does not exist; pass an .npz in the authors' format or null for the training set"
        )
    try:
        npz = np.load(path)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"reference={path} is not a readable .npz file ({exc})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ConfigError(
            f"reference={path} holds a single array, not an .npz archive; save it with np.savez(path, arr_0=images)"
        )
    with npz:
        if "arr_0" not in npz.files:
            raise ConfigError(
                f"reference={path} has no 'arr_0' array (it holds {sorted(npz.files)}); expected "
                "the authors' format: arr_0 = uint8 images N x H x W x C"
            )
        try:
            images = npz["arr_0"]
        except ValueError:  # an object array needs pickle, which could run code: never loaded
            raise ConfigError(
                f"reference={path}: arr_0 is an object (pickled) array, which is never loaded; save the images "
                "as a uint8 array with np.savez(path, arr_0=images)"
            ) from None
    if images.dtype != np.uint8:
        raise ConfigError(
            f"reference={path}: arr_0 has dtype {images.dtype}; expected uint8 pixel values "
            "0..255 (convert with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8))"
        )
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ConfigError(
            f"reference={path}: arr_0 has shape {images.shape}; expected N x H x W x C with C = 1 or 3 "
            "(channels last, as evaluate.py task=sample writes)"
        )
    return images


class ReferenceSource:
    """Where the real images come from; knows their count and shape without extracting features."""

    def __init__(self, name: str, image_shape: tuple[int, int, int], count: int, images):
        self.name, self.image_shape, self.count, self._images = name, tuple(image_shape), count, images

    @classmethod
    def from_npz(cls, path) -> "ReferenceSource":
        images = read_npz_images(path)
        digest = hashlib.sha1(images.tobytes()).hexdigest()[:10]
        shape = (images.shape[3], images.shape[1], images.shape[2])
        return cls(
            f"{Path(str(path)).stem}-{digest}",
            shape,
            len(images),
            lambda: torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        )

    @classmethod
    def from_datamodule(cls, data, limit: int | None = None) -> "ReferenceSource":
        """The training set of a data module (built here if needed), without flips; with ``limit``, at most
        that many images, a fixed random subset (a 3-million-image LSUN needs no more than 50,000)."""
        data.setup("fit")
        dataset, name = data.dataset, type(data).__name__.removesuffix("DataModule").lower()
        if getattr(data, "root", None) is not None:
            name += "-" + hashlib.sha1(str(Path(data.root).resolve()).encode()).hexdigest()[:8]
        if limit is not None and len(dataset) > limit:
            keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
            dataset = Subset(dataset, keep.sort().values.tolist())
        shape = (data.channels, data.image_size, data.image_size)
        return cls(f"{name}-{len(dataset)}", shape, len(dataset), lambda: dataset_uint8(dataset))

    @classmethod
    def create(cls, reference, data, limit: int | None = None) -> "ReferenceSource":
        return cls.from_npz(reference) if reference is not None else cls.from_datamodule(data, limit)

    def check(self, image_shape, fidelity: Fidelity, what: str) -> None:
        """Stops before sampling when the generated images cannot be compared with this reference."""
        if tuple(image_shape) != self.image_shape:
            c, h, w = image_shape
            rc, rh, rw = self.image_shape
            raise ConfigError(
                f"{what} makes {h}x{w} images with {c} channel(s) but the reference statistics ({self.name}) are of "
                f"{rh}x{rw} images with {rc}; use a reference of the model's resolution (reference=<npz> or null "
                "for its training set)"
            )
        fidelity.check_count(self.count, f"the reference ({self.name}) image count", generated=False)

    def cache_path(self, fidelity: Fidelity, cache_dir) -> Path:
        c, h, _ = self.image_shape
        key = f"cm-{self.name}-{h}px-{c}ch-{fidelity.extractor_name}-{fidelity.weights_digest()}-{fidelity.layer}"
        return Path(cache_dir or default_cache_dir()).expanduser() / f"{key}.npz"

    def load(self, fidelity: Fidelity, cache_dir, device) -> Reference:
        """Reads the cached features, or extracts and caches them (atomically: ranks and runs may race)."""
        path = self.cache_path(fidelity, cache_dir)
        if path.is_file():
            with np.load(path) as cached:
                features = torch.from_numpy(cached["features"])
                return Reference(features, {"mu": cached["mu"], "sigma": cached["sigma"]})
        features = fidelity.features(self._images(), device)[fidelity.layer]
        statistics = fid_features_to_statistics(features)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, features=features.numpy(), **statistics)
        log.info("cached reference statistics of %s in %s", self.name, path)
        return Reference(features, statistics)


def dataset_uint8(dataset, batch_size: int = 512) -> torch.Tensor:
    """All images of an (image in [-1, 1], label) dataset as uint8 N x C x H x W."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return torch.cat([to_uint8(x) for x, _ in loader])
