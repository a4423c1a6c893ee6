import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cm_lightning.nets import adm
from cm_lightning.nets.adm import ADMUNet, AttentionBlock, timestep_embedding

LAYOUT = json.loads((Path(__file__).parent / "data" / "adm-state-dict-layout.json").read_text())

PUBLISHED = {
    "imagenet64_cond": dict(
        image_size=64,
        model_channels=192,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attention_resolutions=(32, 16, 8),
        num_head_channels=64,
        num_classes=1000,
        use_scale_shift_norm=True,
        resblock_updown=True,
    ),
    "lsun256_uncond": dict(
        image_size=256,
        model_channels=256,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        attention_resolutions=(32, 16, 8),
        num_head_channels=64,
        num_classes=0,
        use_scale_shift_norm=False,
        resblock_updown=True,
    ),
}

TINY = dict(
    image_size=16,
    in_channels=1,
    model_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    num_head_channels=8,
)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # These nets are tiny; intra-op threading only adds contention on a shared CPU (seconds instead of ms).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def randomize(net: torch.nn.Module) -> None:
    """Overwrite every parameter, zero-initialised ones included, so outputs and gradients are non-trivial."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_state_dict_layout(name):
    with torch.device("meta"):
        net = ADMUNet(in_channels=3, out_channels=3, **PUBLISHED[name])
    expected = LAYOUT[name]
    got = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert [k for k, _ in got] == [k for k, _ in expected["keys"]]
    assert got == expected["keys"]
    assert sum(p.numel() for p in net.parameters()) == expected["num_params"]


def test_plain_resampling_layout():
    net = ADMUNet(**TINY, resblock_updown=False)
    keys = net.state_dict().keys()
    assert "input_blocks.2.0.op.weight" in keys
    assert "output_blocks.1.2.conv.weight" in keys
    assert net.num_levels == 2 and net.image_size == 16 and net.in_channels == 1 and net.num_classes == 0


def test_timestep_embedding_formula():
    t = torch.tensor([2.5, -7.0])
    emb = timestep_embedding(t, 8)
    freqs = [1.0, 0.1, 0.01, 0.001]  # 10000 ** (-i / 4)
    for row, value in enumerate(t.tolist()):
        expected = [math.cos(value * f) for f in freqs] + [math.sin(value * f) for f in freqs]
        assert emb[row].tolist() == pytest.approx(expected, abs=1e-6)

    odd = timestep_embedding(t, 5)
    expected = [math.cos(2.5), math.cos(0.025), math.sin(2.5), math.sin(0.025), 0.0]
    assert odd[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_net_feeds_embedding_to_time_embed():
    net = ADMUNet(**TINY)
    seen = []
    net.time_embed[0].register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    labels = torch.tensor([3.0, -250.0])
    net(torch.zeros(2, 1, 16, 16), labels)
    torch.testing.assert_close(seen[0], timestep_embedding(labels, 8))


def test_attention_matches_hand_computation():
    channels, heads, head_dim = 8, 2, 4
    block = AttentionBlock(channels, heads, norm_groups=32)
    randomize(block)
    x = torch.randn(2, channels, 2, 3, generator=torch.Generator().manual_seed(1))

    out = block(x)

    normed = F.group_norm(x, math.gcd(32, channels), block.norm.weight, block.norm.bias).flatten(2)
    w_qkv = block.qkv.weight[:, :, 0, 0]
    w_proj = block.proj_out.weight[:, :, 0, 0]
    for b in range(x.shape[0]):
        qkv = w_qkv @ normed[b] + block.qkv.bias[:, None]  # (3c, pixels)
        q, k, v = qkv[:channels], qkv[channels : 2 * channels], qkv[2 * channels :]
        per_head = []
        for h in range(heads):
            rows = slice(h * head_dim, (h + 1) * head_dim)
            weights = torch.softmax(q[rows].T @ k[rows] / math.sqrt(head_dim), dim=-1)  # (query, key)
            per_head.append(v[rows] @ weights.T)
        attended = torch.cat(per_head)
        expected = x[b].flatten(1) + w_proj @ attended + block.proj_out.bias[:, None]
        torch.testing.assert_close(out[b].flatten(1), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_classes", [0, 10])
def test_forward_shape(num_classes):
    net = ADMUNet(**TINY, num_classes=num_classes)
    randomize(net)
    labels = torch.tensor([1, 7]) if num_classes else None
    out = net(torch.randn(2, 1, 16, 16), torch.tensor([0.5, -3.0]), labels)
    assert out.shape == (2, 1, 16, 16)
    assert torch.isfinite(out).all()


def test_out_channels_and_num_heads():
    net = ADMUNet(**{**TINY, "num_head_channels": -1}, num_heads=4, out_channels=2)
    assert net.middle_block[1].num_heads == 4
    assert net(torch.zeros(1, 1, 16, 16), torch.zeros(1)).shape == (1, 2, 16, 16)


def test_class_label_checks():
    cond = ADMUNet(**TINY, num_classes=10)
    with pytest.raises(ValueError, match="class_labels"):
        cond(torch.zeros(2, 1, 16, 16), torch.zeros(2))
    uncond = ADMUNet(**TINY)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(torch.zeros(2, 1, 16, 16), torch.zeros(2), torch.tensor([0, 1]))


def test_config_validation():
    with pytest.raises(ValueError, match=r"image_size=30 .*2\*\*\(levels-1\)=4"):
        ADMUNet(image_size=30, model_channels=8, channel_mult=(1, 2, 2), attention_resolutions=())
    with pytest.raises(ValueError, match="num_head_channels=3"):
        ADMUNet(**{**TINY, "num_head_channels": 3})
    with pytest.raises(ValueError, match=r"attention_resolutions=\(32,\)"):
        ADMUNet(**{**TINY, "attention_resolutions": (32,)})


def test_input_checks():
    net = ADMUNet(**TINY)
    with pytest.raises(ValueError, match="image_size=16"):
        net(torch.zeros(1, 1, 32, 32), torch.zeros(1))
    with pytest.raises(ValueError, match="1 channels"):
        net(torch.zeros(1, 3, 16, 16), torch.zeros(1))
    with pytest.raises(ValueError, match="noise_labels"):
        net(torch.zeros(2, 1, 16, 16), torch.zeros(3))


def test_checkpointing_matches_plain(monkeypatch):
    net = ADMUNet(**TINY, num_classes=3, dropout=0.2)
    randomize(net)
    net.train()
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    sigma_labels, classes = torch.tensor([0.3, 2.0]), torch.tensor([0, 2])

    def run():
        net.zero_grad()
        torch.manual_seed(3)  # dropout must draw the same masks in both runs
        out = net(x, sigma_labels, classes)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    plain_out, plain_grads = run()

    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(adm, "checkpoint", counting_checkpoint)
    net.use_checkpoint = True
    ckpt_out, ckpt_grads = run()

    blocks = len(net.input_blocks) + 1 + len(net.output_blocks)
    assert calls == [False] * blocks
    torch.testing.assert_close(ckpt_out, plain_out)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)

    calls.clear()
    net.eval()
    net(x, sigma_labels, classes)
    assert calls == []
