"""torch-fidelity feature extractor "dinov2-vitl14": FD-DINOv2, the Frechet distance that EDM2 and sCM report at
512 pixels (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics"), in the features of DINOv2
ViT-L/14 (Oquab et al. 2023): the class token after the final norm, 1024-d.

The network is built here with facebookresearch/dinov2's state-dict keys, so that the official
``dinov2_vitl14_pretrain.pth`` loads with ``weights_only=True`` (torch-fidelity's own DINOv2 extractor fetches its
code and weights through torch.hub, and this project downloads nothing). Images go in as EDM2's
``calculate_metrics.py`` (resize_mode='torch') feeds them: bicubic antialiased resize to 224 x 224, [0, 1], ImageNet
mean and std. It has no class logits, so it gives FID (here FD-DINOv2), KID and precision/recall, not IS.
"""

import math

import torch
import torch.nn.functional as F
import torch_fidelity
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from cm_lightning.untrusted import load_weights

FEATURE_EXTRACTOR_NAME = "dinov2-vitl14"
WEIGHTS_FILE = "dinov2_vitl14_pretrain.pth"
WEIGHTS_URL = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/{WEIGHTS_FILE}"
INPUT_SIZE = 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with layer scale: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = Attention(dim, num_heads), Mlp(dim, 4 * dim)
        self.ls1, self.ls2 = LayerScale(dim), LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoV2(nn.Module):
    """DINOv2's ViT (hub ``dinov2_vitl14`` by default: 1024 wide, 24 blocks, 16 heads, 14-pixel patches, position
    embeddings for a 518-pixel input), returning the normalised class token."""

    def __init__(self, dim: int = 1024, depth: int = 24, num_heads: int = 16, patch: int = 14, train_size: int = 518):
        super().__init__()
        self.patch = patch
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (train_size // patch) ** 2, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # used only in DINOv2's training; kept for its keys
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """The stored grid resized bicubically to the input's patch grid, with DINOv2's scale factor
        (patches + 0.1) / grid (its ``interpolate_offset``), which makes the output size exact."""
        grid = int(math.sqrt(self.pos_embed.shape[1] - 1))
        h, w = height // self.patch, width // self.patch
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        if (h, w) == (grid, grid):
            return self.pos_embed
        patches = patches.float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, scale_factor=((h + 0.1) / grid, (w + 0.1) / grid), mode="bicubic")
        patches = patches.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(cls.dtype)
        return torch.cat([cls, patches], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(*x.shape[-2:])
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x {1,3} x H x W -> DINOv2's input: grey as RGB, 224 x 224 bicubic antialiased, ImageNet-normalised."""
    x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    x = F.interpolate(x.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True) / 255
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (MEAN, STD))
    return (x - mean) / std


class FeatureExtractorDinoV2(FeatureExtractorBase):
    """Maps uint8 images to DINOv2 ViT-L/14 class tokens ("dinov2"), from a weights file read safely."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.model = DinoV2()
        if feature_extractor_weights_path is not None:
            state = load_weights(feature_extractor_weights_path, "feature_extractor_weights_path")
            self.model.load_state_dict(state)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Expected uint8 images of shape N x 1|3 x H x W, got {x.dtype} {tuple(x.shape)}")
        return (self.model(preprocess(x)),)

    @staticmethod
    def get_provided_features_list():
        return ("dinov2",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "dinov2", "kid": "dinov2", "prc": "dinov2"}.get(metric)

    @staticmethod
    def can_be_compiled():
        return True

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8)


if FEATURE_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(FEATURE_EXTRACTOR_NAME, FeatureExtractorDinoV2)
