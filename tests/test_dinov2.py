"""FD-DINOv2 (metrics.feature_extractor=dinov2-vitl14): DINOv2 ViT-L/14 with the official state-dict keys, built
with random weights (nothing is downloaded), its input as EDM2's calculate_metrics.py prepares it, and FID in its
features from Fidelity and from evaluate.py."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers.launch import run_script
from torch_fidelity.metric_fid import fid_features_to_statistics

from cm_lightning.errors import ConfigError
from cm_lightning.metrics.dinov2 import DinoV2, preprocess
from cm_lightning.metrics.fidelity import Fidelity
from cm_lightning.metrics.reference import Reference


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random ViT-L/14 saved as facebookresearch/dinov2 saves dinov2_vitl14_pretrain.pth: a plain state dict."""
    torch.manual_seed(0)
    net = DinoV2()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
        for block in net.blocks:
            block.ls1.gamma.fill_(0.1)
            block.ls2.gamma.fill_(0.1)
        for norm in [m for m in net.modules() if isinstance(m, torch.nn.LayerNorm)]:
            norm.weight.fill_(1)
            norm.bias.zero_()  # unit-scale features, so that distances are not all ~0
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vitl14_pretrain.pth"
    torch.save(net.state_dict(), path)
    return path


def test_vitl14_has_the_official_keys_and_shapes():
    state = DinoV2().state_dict()
    assert len([k for k in state if k.endswith(".ls1.gamma")]) == 24
    expected = {
        "cls_token": (1, 1, 1024),
        "pos_embed": (1, 1 + 37 * 37, 1024),  # a 518-pixel training input of 14-pixel patches
        "mask_token": (1, 1024),
        "patch_embed.proj.weight": (1024, 3, 14, 14),
        "blocks.0.attn.qkv.weight": (3072, 1024),
        "blocks.0.attn.proj.bias": (1024,),
        "blocks.0.mlp.fc1.weight": (4096, 1024),
        "blocks.23.mlp.fc2.weight": (1024, 4096),
        "blocks.23.ls2.gamma": (1024,),
        "norm.weight": (1024,),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    per_block = {k.split(".", 2)[2] for k in state if k.startswith("blocks.0.")}
    assert per_block == {
        f"{layer}.{p}"
        for layer in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
        for p in ("weight", "bias")
    } | {"ls1.gamma", "ls2.gamma"}


def test_position_embedding_at_the_training_size_is_the_stored_one_and_at_224_a_16x16_grid():
    net = DinoV2(dim=8, depth=1, num_heads=2)
    with torch.no_grad():
        net.pos_embed.normal_()
    assert net.position_embedding(518, 518) is net.pos_embed
    resized = net.position_embedding(224, 224)
    assert resized.shape == (1, 1 + 16 * 16, 8)
    assert torch.equal(resized[:, 0], net.pos_embed[:, 0])  # the class token's is never resized
    grid = net.pos_embed[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    # DINOv2's interpolate_offset: scale (16 + 0.1) / 37, which bicubic-resizes to 16 x 16 exactly.
    expected = F.interpolate(grid, scale_factor=16.1 / 37, mode="bicubic").permute(0, 2, 3, 1).reshape(1, 256, 8)
    torch.testing.assert_close(resized[:, 1:], expected)


def test_input_is_edm2s_bicubic_224_in_imagenet_units():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    x = preprocess(images)
    resized = F.interpolate(images.float(), size=(224, 224), mode="bicubic", antialias=True) / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x, (resized - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    grey = images[:, :1]
    torch.testing.assert_close(preprocess(grey), preprocess(grey.expand(-1, 3, -1, -1)))


def test_fd_dinov2_of_a_set_against_itself_is_zero_and_against_noise_is_not(weights):
    fidelity = Fidelity("dinov2-vitl14", weights, isc=False, batch_size=3)
    torch.manual_seed(1)
    digits = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    features = fidelity.features(digits, "cpu")["dinov2"]
    assert features.shape == (3, 1024)
    reference = Reference(features, fid_features_to_statistics(features))
    assert fidelity.compute({"dinov2": features}, reference)["fid"] == pytest.approx(0, abs=1e-3)
    other = fidelity.features(torch.full_like(digits, 255), "cpu")
    assert fidelity.compute(other, reference)["fid"] > 1


def test_dinov2_refuses_inception_score_and_names_the_weights_it_lacks(weights, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="isc=true needs class logits, which dinov2-vitl14 has not; set isc=false"):
        Fidelity("dinov2-vitl14", weights)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ConfigError, match="dinov2_vitl14_pretrain.pth"):
        Fidelity("dinov2-vitl14", None, isc=False)


@pytest.mark.slow
def test_evaluate_fid_with_dinov2_features(cd_run, weights, tmp_path):
    out = tmp_path / "eval"
    run_script(
        "evaluate.py",
        "task=fid",
        f"ckpt={cd_run / 'checkpoints/last.ckpt'}",
        "num=12",
        "steps=[1]",
        "batch_size=6",
        "device=cpu",
        "metrics.feature_extractor=dinov2-vitl14",
        f"metrics.feature_extractor_weights_path={weights}",
        "metrics.isc=false",
        "metrics.reference_num=12",
        f"metrics.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={out}",
    )
    results = json.loads((out / "metrics.json").read_text())["results"]["1step"]
    assert results["fid"] > 0 and results["nfe"] == 1
    assert [p.name for p in (tmp_path / "cache").iterdir() if "dinov2-vitl14" in p.name]  # its own reference
