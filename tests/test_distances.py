import math

import pytest
import torch
from torchvision.models.vgg import cfgs, make_layers

from cm_lightning.diffusion.distances import L1, L2, LPIPS, PseudoHuber
from cm_lightning.errors import ConfigError


def test_l2_l1_per_image():
    x, y = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    y[1] = 2.0
    torch.testing.assert_close(L2()(x, y), torch.tensor([0.0, 4.0]))
    torch.testing.assert_close(L1()(x, y), torch.tensor([0.0, 2.0]))


def test_pseudo_huber_is_per_image():
    torch.manual_seed(0)
    x, y = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    d = PseudoHuber(0.00054)
    c = 0.00054 * math.sqrt(3 * 8 * 8)
    assert d.c(x) == pytest.approx(c)
    expected = torch.stack([torch.sqrt(((x[i] - y[i]) ** 2).sum() + c**2) - c for i in range(3)])
    torch.testing.assert_close(d(x, y), expected)
    per_pixel = (torch.sqrt((x - y) ** 2 + c**2) - c).flatten(1).mean(1)
    assert not torch.allclose(d(x, y), per_pixel, rtol=1e-2)
    assert d(x, x).abs().max() < 1e-6


def test_pseudo_huber_rejects_non_positive_c():
    with pytest.raises(ValueError, match="c_scale=0"):
        PseudoHuber(0)


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("lpips")
    features = make_layers(cfgs["D"])
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, d / "vgg16.pth")
    torch.save(
        {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))},
        d / "vgg.pth",
    )
    return d


def test_lpips_from_local_files(lpips_files):
    lp = LPIPS(lin_weights=lpips_files / "vgg.pth", vgg_weights=lpips_files / "vgg16.pth", resize_to=32)
    x = (torch.rand(2, 1, 16, 16) * 2 - 1).requires_grad_()
    y = torch.rand(2, 1, 16, 16) * 2 - 1
    d = lp(x, y)
    assert d.shape == (2,) and torch.all(d > 0)
    assert torch.allclose(lp(y, y), torch.zeros(2), atol=1e-6)
    d.sum().backward()
    assert x.grad is not None and not any(p.requires_grad for p in lp.parameters())


def test_lpips_missing_weights_say_where(lpips_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="lin_weights"):
        LPIPS(lin_weights=tmp_path / "nope.pth", vgg_weights=lpips_files / "vgg16.pth")
    with pytest.raises(FileNotFoundError, match="vgg_weights"):
        LPIPS(lin_weights=lpips_files / "vgg.pth", vgg_weights=tmp_path / "nope.pth")


def test_lpips_avg_pooling_matches_the_authors_piq(lpips_files, monkeypatch):
    """The CM authors' loss: piq.LPIPS(replace_pooling=True) on (x + 1) / 2 upsampled to 224 (cm/karras_diffusion.py),
    with piq's downloads replaced by the same VGG and linear-layer state dicts."""
    piq = pytest.importorskip("piq")
    from types import SimpleNamespace

    from cm_lightning.diffusion.lpips import torchmetrics_lin_weights

    vgg = torch.load(lpips_files / "vgg16.pth", weights_only=True)
    lin = torch.load(torchmetrics_lin_weights(), map_location="cpu", weights_only=True)

    def vgg16(**_):
        features = make_layers(cfgs["D"])
        features.load_state_dict({k[len("features.") :]: v for k, v in vgg.items()})
        return SimpleNamespace(features=features)

    monkeypatch.setattr(piq.perceptual, "vgg16", vgg16)
    monkeypatch.setattr(piq.perceptual.torch.hub, "load_state_dict_from_url", lambda *a, **k: list(lin.values()))
    theirs = piq.LPIPS(replace_pooling=True, reduction="none")
    ours = LPIPS(vgg_weights=lpips_files / "vgg16.pth", pooling="avg")

    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    up = lambda im: torch.nn.functional.interpolate(im, size=224, mode="bilinear")  # noqa: E731
    torch.testing.assert_close(ours(x, y), theirs((up(x) + 1) / 2, (up(y) + 1) / 2), rtol=0, atol=1e-5)
    # Unresized noise, where the two poolings differ by far more than the tolerance.
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    expected = theirs((x + 1) / 2, (y + 1) / 2)
    torch.testing.assert_close(
        LPIPS(vgg_weights=lpips_files / "vgg16.pth", pooling="avg", resize_to=64)(x, y), expected, rtol=0, atol=1e-5
    )
    max_pooled = LPIPS(vgg_weights=lpips_files / "vgg16.pth", pooling="max", resize_to=64)(x, y)
    assert (max_pooled - expected).abs().min() > 1e-3


def test_lpips_unknown_pooling_says_which(lpips_files):
    with pytest.raises(ConfigError, match="pooling='mean'.*'avg'.*'max'"):
        LPIPS(vgg_weights=lpips_files / "vgg16.pth", pooling="mean")
