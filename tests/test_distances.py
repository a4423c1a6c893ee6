import math

import pytest
import torch
from torchvision.models.vgg import cfgs, make_layers

from cm_lightning.diffusion.distances import L1, L2, LPIPS, PseudoHuber


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
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))},
               d / "vgg.pth")
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
