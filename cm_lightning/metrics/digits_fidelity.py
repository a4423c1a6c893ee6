"""torch-fidelity feature extractor "digits-classifier", backed by the shipped DigitsClassifier.

Importing this module registers the extractor, after which any torch-fidelity metric can use it via
`feature_extractor="digits-classifier"`: FID/KID/PRC on "features", ISC on "logits_unbiased".
"""

import torch
import torch.nn.functional as F
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from cm_lightning.metrics.digits_classifier import (
    IMAGE_SIZE,
    WEIGHTS_PATH,
    load_pretrained_digits_classifier,
)

FEATURE_EXTRACTOR_NAME = "digits-classifier"
_LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)


class FeatureExtractorDigits(FeatureExtractorBase):
    """Maps uint8 N x {1,3} x H x W images to DigitsClassifier features and logits."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        # torch-fidelity passes every calculate_metrics kwarg to the constructor; only the weights
        # path concerns this extractor.
        super().__init__(name, features_list)
        self.model = load_pretrained_digits_classifier(feature_extractor_weights_path or WEIGHTS_PATH)
        self.register_buffer("luma", torch.tensor(_LUMA_WEIGHTS).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Expected uint8 images of shape N x 1|3 x H x W, got {x.dtype} {tuple(x.shape)}")
        x = x.to(torch.float32)
        if x.shape[1] == 3:
            x = (x * self.luma).sum(dim=1, keepdim=True)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
        x = x / 255 * 2 - 1
        features = self.model.features(x)
        computed = {"features": features}
        if "logits_unbiased" in self.features_list:
            computed["logits_unbiased"] = self.model.head(features)
        # torch-fidelity zips the returned tuple with the requested list, so order follows it.
        return tuple(computed[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits_unbiased"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits_unbiased", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return True

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 1, IMAGE_SIZE, IMAGE_SIZE]) * 255).to(torch.uint8)


# torch-fidelity refuses duplicate names, and a module reload must not make the import fail.
if FEATURE_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(FEATURE_EXTRACTOR_NAME, FeatureExtractorDigits)


class _UInt8Images(Dataset):
    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"Expected a uint8 N x C x H x W tensor, got {images.dtype} {tuple(images.shape)}")
        self.images = images.cpu()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


def digits_metrics(
    generated_uint8: torch.Tensor,
    reference_uint8: torch.Tensor,
    isc: bool = True,
    fid: bool = True,
    kid: bool = False,
    **kwargs,
) -> dict:
    """torch-fidelity metrics of generated vs reference uint8 images under the digits classifier.

    Extra kwargs go to `torch_fidelity.calculate_metrics` and override the defaults set here.
    """
    options = dict(
        input1=_UInt8Images(generated_uint8),
        input2=_UInt8Images(reference_uint8),
        isc=isc,
        fid=fid,
        kid=kid,
        feature_extractor=FEATURE_EXTRACTOR_NAME,
        feature_layer_isc="logits_unbiased",
        feature_layer_fid="features",
        feature_layer_kid="features",
        # KID's default subset of 1000 exceeds small evaluation sets, which torch-fidelity rejects.
        kid_subset_size=min(1000, len(generated_uint8), len(reference_uint8)),
        cuda=torch.cuda.is_available(),
        # Worker processes cost more than the tiny classifier's whole forward pass.
        save_cpu_ram=True,
        verbose=False,
    )
    options.update(kwargs)
    return torch_fidelity.calculate_metrics(**options)
