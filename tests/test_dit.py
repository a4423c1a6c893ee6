"""DiT (nets/dit.py): the official layout of DiT-B/2 and XL/2 key for key, adaLN-Zero's identity blocks at
initialisation, the fixed 2D sin-cos embedding against its formula, and the two-time conditioning MeanFlow uses."""

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cm_lightning.errors import ConfigError
from cm_lightning.nets.dit import DiT

DATA = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parents[1]
LAYOUT = json.loads((DATA / "dit-state-dict-layout.json").read_text())
PRESETS = {"DiT-B/2": "dit_b_2", "DiT-XL/2": "dit_xl_2"}


def tiny_dit(**kwargs) -> DiT:
    torch.manual_seed(0)
    args = dict(image_size=8, in_channels=2, patch_size=2, hidden_size=32, depth=2, num_heads=4) | kwargs
    return DiT(**args)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_have_the_official_state_dict(name):
    """The net config with DiT's released options (1,000 classes and the "no class" row, 2C outputs) builds the
    official keys in the official order, with their shapes and parameter count; built on the meta device."""
    cfg = OmegaConf.load(ROOT / "conf" / "net" / f"{PRESETS[name]}.yaml")
    cfg.merge_with({"image_size": 32, "in_channels": 4, "num_classes": 1000, "null_class": True, "learn_sigma": True})
    with torch.device("meta"):
        net = instantiate(cfg)
    expected = LAYOUT[name]
    assert [(k, list(v.shape)) for k, v in net.state_dict().items()] == [
        (k, v) for k, v in expected["state_dict"].items()
    ]
    assert sum(p.numel() for p in net.parameters()) == expected["num_params"]
    assert not net.pos_embed.requires_grad


def test_fresh_blocks_are_the_identity_and_the_output_zero():
    """adaLN-Zero (DiT, Section 3.2): every gate regresses from zero weights, so each block returns its input,
    and the zeroed output layer makes the whole net return zeros."""
    net = tiny_dit(num_classes=3)
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in net.blocks:
        torch.testing.assert_close(block(h, c), h, rtol=0, atol=0)
    x = torch.randn(2, 2, 8, 8)
    assert torch.equal(net(x, torch.rand(2), torch.tensor([0, 2])), torch.zeros_like(x))


def test_positional_embedding_is_the_2d_sincos_formula():
    """Token (row i, column j), channel k < D/4: sin(j w_k); D/4 + k: cos(j w_k); then the same of i, with
    w_k = 10000^(-k / (D/4)) (DiT's get_2d_sincos_pos_embed, whose first half encodes the column)."""
    net, d = tiny_dit(), 32
    pos = net.pos_embed[0].double()
    quarter = d // 4
    for token, (i, j) in enumerate((i, j) for i in range(4) for j in range(4)):
        for k in range(quarter):
            w = 10000 ** (-k / quarter)
            expected = [math.sin(j * w), math.cos(j * w), math.sin(i * w), math.cos(i * w)]
            got = [pos[token, k + q * quarter].item() for q in range(4)]
            assert got == pytest.approx(expected, abs=1e-6)


def test_patchify_and_unpatchify_are_inverse():
    """The output layer's token t, feature (a, b, c) lands at pixel (p row + a, p col + b) of channel c."""
    net = tiny_dit()
    tokens = torch.arange(16 * 2 * 2 * 2, dtype=torch.float32).reshape(1, 16, 8)
    image = net.unpatchify(tokens)
    row, col, a, b, c = 1, 3, 1, 0, 1
    assert image[0, c, 2 * row + a, 2 * col + b] == tokens[0, 4 * row + col, (a * 2 + b) * 2 + c]


def test_two_times_each_have_an_embedder_summed():
    """num_times=2: the conditioning is t_embedder(t) + h_embedder(t - r): t - r alone changes the output, and
    with the h-embedder's last layer zeroed (its output a constant 0) it no longer does."""
    net = tiny_dit(num_times=2)
    for p in net.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.2)
    x = torch.randn(1, 2, 8, 8).expand(2, -1, -1, -1)
    t = torch.tensor([[0.5, 0.0], [0.5, 0.3]])
    out = net(x, t)
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    for p in net.h_embedder.mlp[2].parameters():
        p.data.zero_()
    out = net(x, t)
    torch.testing.assert_close(out[0], out[1])


def test_bad_net_settings_stop_with_one_line():
    with pytest.raises(ConfigError, match="net.patch_size=3 does not divide the resolution 8"):
        tiny_dit(patch_size=3)
    with pytest.raises(ConfigError, match="null_class=true"):
        tiny_dit(null_class=True)
