"""FID, IS, KID and precision/recall of generated uint8 images, computed with torch-fidelity.

The same code serves the training callback and ``evaluate.py``: features come from a torch-fidelity
feature extractor, and the metrics from torch-fidelity's own functions, so the numbers equal a
direct ``torch_fidelity.calculate_metrics`` call on the same images. The reference side (the
training set) arrives as cached features and FID statistics (``reference.py``), never re-extracted.

Extractors: ``inception-v3-compat`` (torch-fidelity's port of the TF-slim Inception, comparable to
published FIDs), ``dinov2-vitl14`` (``dinov2.py``: FD-DINOv2, as EDM2 and sCM report at 512; its "fid" is the
Frechet distance in DINOv2 features) and ``digits-classifier`` (``digits_fidelity.py``, meaningful on 16x16 digits).
Nothing is downloaded: weights come from a path or an existing file in torch's cache, and are read with
``weights_only=True`` (``untrusted.py``).
"""

import hashlib
import logging
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from cm_lightning.errors import ConfigError
from cm_lightning.metrics import digits_fidelity, dinov2
from cm_lightning.metrics.digits_classifier import WEIGHTS_PATH as DIGITS_WEIGHTS
from cm_lightning.untrusted import load_weights, weights_stream

log = logging.getLogger(__name__)
INCEPTION = "inception-v3-compat"
DINOV2 = dinov2.FEATURE_EXTRACTOR_NAME
EXTRACTORS = (INCEPTION, DINOV2, digits_fidelity.FEATURE_EXTRACTOR_NAME)
# Where torch.hub would have stored each downloaded extractor's weights, and where they come from.
DOWNLOADED = {INCEPTION: URL_INCEPTION_V3, DINOV2: dinov2.WEIGHTS_URL}
# torch-fidelity's result keys -> the short names logged as metrics/<name>_<k>step.
NAMES = {
    "frechet_inception_distance": "fid",
    "inception_score_mean": "is",
    "inception_score_std": "is_std",
    "kernel_inception_distance_mean": "kid",
    "kernel_inception_distance_std": "kid_std",
    "precision": "precision",
    "recall": "recall",
    "f_score": "f_score",
}


def hub_cache_path(extractor: str = INCEPTION) -> Path:
    """Where torch.hub would have stored the extractor's weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / DOWNLOADED[extractor].rsplit("/", 1)[1]


def resolve_weights(extractor: str, path) -> Path:
    """The extractor's weights file, which must exist: nothing is ever downloaded."""
    if extractor not in EXTRACTORS:
        raise ConfigError(f"feature_extractor={extractor!r} is unknown; choose one of {list(EXTRACTORS)}")
    if path is not None:
        path = Path(str(path)).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"feature_extractor_weights_path={path} does not exist; point it at the {extractor} weights file"
                + (f" ({DOWNLOADED[extractor]})" if extractor in DOWNLOADED else "")
            )
        return path
    if extractor not in DOWNLOADED:
        return DIGITS_WEIGHTS
    path = hub_cache_path(extractor)
    if not path.is_file():
        raise ConfigError(
            f"{extractor} weights not found at {path} (torch's cache); nothing is downloaded at run "
            f"time. Download {DOWNLOADED[extractor]} to that path, or set feature_extractor_weights_path=<file>"
        )
    return path


def warn_rank_deficient(generated: int, reference: int, dim: int) -> None:
    """FID (Heusel et al. 2017, eq. 6) fits a dim x dim covariance to each side: with fewer images than feature
    dimensions it is singular and the number is meaningless (a 10-image reference scores FID ~1600)."""
    if min(generated, reference) < dim:
        log.warning(
            "FID from %d generated and %d reference images is unreliable: each side needs at least %d (the "
            "feature dimension); raise num= or the reference count",
            generated,
            reference,
            dim,
        )


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images to uint8 N x C x H x W, rounded like the .npz files evaluate.py writes."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# The keys of a metrics config (conf/metrics/default.yaml) that say what Fidelity measures.
SETTINGS = ("feature_extractor", "feature_extractor_weights_path", "fid", "isc", "kid", "prc", "kid_subset_size")


class Fidelity:
    """Which metrics, on which features; ``features`` on any rank, ``compute`` where they were gathered."""

    @classmethod
    def from_config(cls, m) -> "Fidelity":
        """The Fidelity a metrics config names (evaluate.py's ``metrics`` or the metrics callback's arguments)."""
        return cls(**{key: m[key] for key in SETTINGS})

    def __init__(
        self,
        feature_extractor: str = digits_fidelity.FEATURE_EXTRACTOR_NAME,
        feature_extractor_weights_path=None,
        fid: bool = True,
        isc: bool = True,
        kid: bool = False,
        prc: bool = False,
        kid_subset_size: int = 1000,
        batch_size: int = 256,
    ):
        self.extractor_name = feature_extractor
        self.weights = resolve_weights(feature_extractor, feature_extractor_weights_path)
        load_weights(self.weights, "feature_extractor_weights_path", mmap=True)  # refused now, not after sampling
        if not (fid or isc or kid or prc):
            raise ConfigError("fid, isc, kid and prc are all false; enable at least one metric")
        self.fid, self.isc, self.kid, self.prc = fid, isc, kid, prc
        self.kid_subset_size, self.batch_size = int(kid_subset_size), batch_size
        cls = FEATURE_EXTRACTORS_REGISTRY[feature_extractor]
        # FID, KID and precision/recall share one layer in every extractor; the reference caches it.
        self.layer = cls.get_default_feature_layer_for_metric("fid")
        self.isc_layer = cls.get_default_feature_layer_for_metric("isc")
        if isc and self.isc_layer is None:
            raise ConfigError(f"isc=true needs class logits, which {feature_extractor} has not; set isc=false")
        self._extractor = None

    @property
    def layers(self) -> list[str]:
        """Features to extract: the reference's layer always (its statistics are cached), IS's logits if asked."""
        return [self.layer] + ([self.isc_layer] if self.isc and self.isc_layer != self.layer else [])

    @property
    def options(self) -> dict:
        """torch-fidelity's keyword arguments for the metric functions (its defaults otherwise)."""
        return dict(kid_subset_size=self.kid_subset_size, save_cpu_ram=True, verbose=False)

    def weights_digest(self) -> str:
        return hashlib.sha1(self.weights.read_bytes()).hexdigest()[:10]

    def check_count(self, count: int, what: str, generated: bool = True) -> None:
        """KID draws subsets of kid_subset_size images from each side; IS splits the generated ones in 10."""
        if self.kid and count < self.kid_subset_size:
            raise ConfigError(
                f"{what}={count} is smaller than kid_subset_size={self.kid_subset_size}; "
                f"use at least {self.kid_subset_size} images or set kid_subset_size<={count}"
            )
        if generated and self.isc and count < 10:
            raise ConfigError(f"{what}={count}: the Inception Score splits samples in 10 groups; use at least 10")

    def extractor(self, device) -> torch.nn.Module:
        if self._extractor is None:
            cls = FEATURE_EXTRACTORS_REGISTRY[self.extractor_name]
            # torch-fidelity's Inception unpickles its weights without restriction: it gets what load_file
            # accepted instead. The digits extractor is ours and loads with weights_only=True.
            weights = str(self.weights)
            if self.extractor_name == INCEPTION:
                weights = weights_stream(self.weights, "feature_extractor_weights_path")
            self._extractor = cls(self.extractor_name, self.layers, feature_extractor_weights_path=weights)
        return self._extractor.to(device)

    @torch.no_grad()
    def features(self, images: torch.Tensor, device) -> dict[str, torch.Tensor]:
        """uint8 N x C x H x W -> {layer: float32 N x D on the CPU}, extracted in batches of ``batch_size``."""
        extractor = self.extractor(device)
        if self.extractor_name == INCEPTION and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)  # Inception takes RGB; grey images become grey RGB
        out: dict[str, list] = {}
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size].to(device)
            for name, value in extractor.convert_features_tuple_to_dict(extractor(batch)).items():
                out.setdefault(name, []).append(value.float().cpu())
        return {name: torch.cat(values) for name, values in out.items()}

    def compute(self, generated: dict[str, torch.Tensor], reference) -> dict[str, float]:
        """Metrics of generated features against a ``reference.Reference``, with short names (fid, is, ...)."""
        results = {}
        if self.isc:
            results.update(isc_featuresdict_to_metric(generated, self.isc_layer, **self.options))
        if self.fid:
            warn_rank_deficient(len(generated[self.layer]), len(reference.features), generated[self.layer].shape[1])
            stats = fid_features_to_statistics(generated[self.layer])
            results.update(fid_statistics_to_metric(stats, reference.statistics, verbose=False))
        ref = {self.layer: reference.features}
        if self.kid:
            results.update(kid_featuresdict_to_metric(generated, ref, self.layer, **self.options))
        if self.prc:
            results.update(prc_featuresdict_to_metric(generated, ref, self.layer, **self.options))
        return {NAMES[k]: float(v) for k, v in results.items()}
