"""NCSN++ / DDPM++: the published sizes, the noise embeddings and resampling filters against hand-computed
values, the residual scaling, and the interface it shares with the ADM U-Net."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cm_lightning.nets.ncsnpp import FourierEmbedding, NCSNpp, PositionalEmbedding, Resample, ResBlock

CONF = Path(__file__).resolve().parents[1] / "conf" / "net"
TINY = dict(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,))
DDPMPP = dict(
    embedding="positional", embedding_scale=1.0, noise_channel_mult=1, encoder="standard", resample_filter=(1, 1)
)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def randomize(net, std=0.2):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return net


@pytest.mark.parametrize("name,params", [("ncsnpp_cifar10", 56_395_523), ("ddpmpp_cifar10", 55_732_739)])
def test_published_configs_have_the_papers_56m_parameters(name, params):
    with torch.device("meta"):
        net = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    count = sum(p.numel() for p in net.parameters())
    assert count == params and round(count / 1e6) == 56  # "NCSN++ 56M" (CM paper, Table of settings)
    assert (net.image_size, net.in_channels, net.num_classes) == (32, 3, 0)


def test_fourier_embedding_by_hand_and_scale():
    torch.manual_seed(0)
    emb = FourierEmbedding(4, scale=16.0)
    f0, f1 = emb.freqs.tolist()
    c = 0.3
    expected = [
        math.cos(2 * math.pi * f0 * c),
        math.cos(2 * math.pi * f1 * c),
        math.sin(2 * math.pi * f0 * c),
        math.sin(2 * math.pi * f1 * c),
    ]
    assert emb(torch.tensor([c]))[0].tolist() == pytest.approx(expected, abs=1e-5)
    torch.manual_seed(0)
    wide = FourierEmbedding(20000, scale=0.02)  # iCT's scale: the frequencies' standard deviation
    assert wide.freqs.std().item() == pytest.approx(0.02, rel=0.03)


def test_positional_embedding_by_hand():
    emb = PositionalEmbedding(8, scale=2.0)
    freqs = [1.0, 0.1, 0.01, 0.001]  # 10000 ** (-i / 4)
    c = 1.5
    expected = [math.cos(2 * c * f) for f in freqs] + [math.sin(2 * c * f) for f in freqs]
    assert emb(torch.tensor([c]))[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_box_resampling_is_average_pooling_and_nearest():
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(Resample((1, 1), up=False)(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(Resample((1, 1), up=True)(x), F.interpolate(x, scale_factor=2, mode="nearest"))


def test_fir_resampling_by_hand():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 4] = 64.0
    down = Resample((1, 3, 3, 1), up=False)(x)
    # Output (i, j) reads input rows 2i-1..2i+2 with taps [1,3,3,1]/8 in each direction.
    assert down.shape == (1, 1, 4, 4)
    assert down[0, 0, 1, 2].item() == pytest.approx(64 * (3 / 8) * (3 / 8))  # row 3 = 2*1+1, col 4 = 2*2
    assert down[0, 0, 2, 2].item() == pytest.approx(64 * (1 / 8) * (3 / 8))  # row 3 = 2*2-1
    assert down.sum().item() == pytest.approx(64 / 4)  # a box of weight 1/4 per output pixel in 2-D
    const = torch.ones(1, 2, 8, 8)
    up = Resample((1, 3, 3, 1), up=True)(const)
    assert up.shape == (1, 2, 16, 16)
    torch.testing.assert_close(up[..., 1:-1, 1:-1], torch.ones(1, 2, 14, 14))  # constants stay constant


def test_block_residuals_are_scaled_by_sqrt_half():
    block = ResBlock(8, 8, emb_channels=4, dropout=0.0, taps=(1, 1), attention=True)
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 4)
    # conv1 and the attention projection start at zero: both residual sums only rescale the input.
    torch.testing.assert_close(block(x, emb), x * 0.5)
    down = ResBlock(8, 16, emb_channels=4, dropout=0.0, taps=(1, 1), down=True)
    torch.testing.assert_close(down(x, emb), down.skip(F.avg_pool2d(x, 2)) * math.sqrt(0.5))


@pytest.mark.parametrize("family", ["ncsnpp", "ddpmpp"])
@pytest.mark.parametrize("num_classes", [0, 5])
def test_forward_like_adm(family, num_classes):
    kwargs = {**TINY, **(DDPMPP if family == "ddpmpp" else {})}
    net = randomize(NCSNpp(in_channels=3, num_classes=num_classes, **kwargs))
    labels = torch.tensor([0, 4]) if num_classes else None
    out = net(torch.randn(2, 3, 16, 16), torch.tensor([0.1, -1.0]), labels)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    aux = [k for k in net.state_dict() if "aux_residual" in k]
    assert bool(aux) == (family == "ncsnpp")  # NCSN++'s progressive input exists only in its encoder
    # The noise label reaches the output (a constant embedding would ignore sigma).
    assert not torch.allclose(out, net(torch.randn(2, 3, 16, 16), torch.tensor([2.0, 3.0]), labels))


def test_copy_embeds_identically():
    a = randomize(NCSNpp(in_channels=1, **TINY))
    b = NCSNpp(in_channels=1, **TINY)  # other random Fourier frequencies until the state dict is loaded
    b.load_state_dict(a.state_dict())
    x, c = torch.randn(2, 1, 16, 16), torch.tensor([0.5, -0.5])
    torch.testing.assert_close(a(x, c), b(x, c))


def test_bad_configuration_and_input():
    with pytest.raises(ValueError, match="embedding='sine'"):
        NCSNpp(**TINY, embedding="sine")
    with pytest.raises(ValueError, match="encoder='skip'"):
        NCSNpp(**TINY, encoder="skip")
    with pytest.raises(ValueError, match=r"attention_resolutions=\(4,\)"):
        NCSNpp(**{**TINY, "attention_resolutions": (4,)})
    with pytest.raises(ValueError, match="image_size=15"):
        NCSNpp(**{**TINY, "image_size": 15})
    net = NCSNpp(in_channels=3, **TINY)
    with pytest.raises(ValueError, match="class_labels"):
        net(torch.zeros(1, 3, 16, 16), torch.zeros(1), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        net(torch.zeros(1, 3, 8, 8), torch.zeros(1))
