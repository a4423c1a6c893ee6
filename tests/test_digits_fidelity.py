import importlib

import pytest
import torch
import torch_fidelity
from torch.utils.data import Dataset

from cm_lightning.metrics import digits_fidelity
from cm_lightning.metrics.digits_classifier import (
    _heldout_split,
    digits_tensor,
    load_pretrained_digits_classifier,
)
from cm_lightning.metrics.digits_fidelity import FEATURE_EXTRACTOR_NAME, digits_metrics

FID = "frechet_inception_distance"
ISC = "inception_score_mean"


@pytest.fixture(scope="module")
def real_halves():
    x, _ = digits_tensor(16)
    images = ((x + 1) / 2 * 255).round().to(torch.uint8)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    half = len(images) // 2
    return images[order[:half]], images[order[half:]]


def test_shipped_classifier_heldout_accuracy():
    _, _, x_test, y_test = _heldout_split()
    with torch.no_grad():
        predictions = load_pretrained_digits_classifier()(x_test).argmax(dim=1)
    assert (predictions == y_test).float().mean().item() > 0.95


def test_missing_weights_error_says_how_to_regenerate(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m cm_lightning.metrics.digits_classifier"):
        load_pretrained_digits_classifier(tmp_path / "absent.pt")


def test_fid_separates_noise_from_real(real_halves):
    first, second = real_halves
    noise = torch.randint(0, 256, first.shape, generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    fid_real = digits_metrics(first, second, isc=False)[FID]
    fid_noise = digits_metrics(noise, second, isc=False)[FID]
    assert fid_noise > 10 * fid_real


def test_inception_score_of_real_and_constant_images(real_halves):
    first, second = real_halves
    assert digits_metrics(first, second, fid=False)[ISC] > 5
    constant = torch.full_like(first, 128)
    assert digits_metrics(constant, second, fid=False)[ISC] == pytest.approx(1, abs=0.05)


def test_rgb_input_matches_gray(real_halves):
    first, _ = real_halves
    extractor = digits_fidelity.FeatureExtractorDigits(FEATURE_EXTRACTOR_NAME, ["features", "logits_unbiased"])
    with torch.no_grad():
        gray = extractor(first[:64])
        rgb = extractor(first[:64].expand(-1, 3, -1, -1))
    # The luminance weights sum to 0.9999, so gray and RGB differ by ~0.03 grey levels.
    for a, b in zip(gray, rgb):
        torch.testing.assert_close(a, b, atol=1e-3 * a.abs().max().item(), rtol=0)


class _Images(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


def test_digits_metrics_equals_direct_torch_fidelity_call(real_halves):
    first, second = real_halves
    first = first[:300]
    wrapped = digits_metrics(first, second, isc=True, fid=True, kid=True)
    direct = torch_fidelity.calculate_metrics(
        input1=_Images(first),
        input2=_Images(second),
        isc=True,
        fid=True,
        kid=True,
        kid_subset_size=len(first),
        feature_extractor=FEATURE_EXTRACTOR_NAME,
        feature_layer_isc="logits_unbiased",
        feature_layer_fid="features",
        feature_layer_kid="features",
        cuda=torch.cuda.is_available(),
        save_cpu_ram=True,
        verbose=False,
    )
    assert wrapped.keys() == direct.keys()
    for key, value in direct.items():
        assert wrapped[key] == pytest.approx(value, rel=1e-9), key


def test_reimport_keeps_a_single_registration():
    importlib.reload(digits_fidelity)
    assert FEATURE_EXTRACTOR_NAME in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY
