"""LPIPS (Zhang et al. 2018, VGG16 variant) as a per-image distance, weights read from local files.

Nothing is downloaded: ``vgg_weights`` is torchvision's ``vgg16-397923af.pth`` (as in
``~/.cache/torch/hub/checkpoints``) and ``lin_weights`` is the LPIPS v0.1 ``vgg.pth`` with keys
``lin{0..4}.model.1.weight``, by default the copy torchmetrics ships. Images smaller than 224 px are
upsampled bilinearly to 224 first, as the CM authors do. ``pooling="avg"`` replaces VGG's max pooling by
2x2 average pooling: the authors' ``piq.LPIPS(replace_pooling=True)``; ``"max"`` is Zhang et al.'s LPIPS.
"""

from importlib.resources import files
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from cm_lightning.errors import ConfigError

# Indices into torchvision's vgg16().features after which LPIPS taps relu1_2 ... relu5_3.
_TAPS = (3, 8, 15, 22, 29)
_CHANNELS = (64, 128, 256, 512, 512)


def _load(path, what: str, fix: str) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS {what} not found at {path}. {fix}")
    return torch.load(path, map_location="cpu", weights_only=True)


def torchmetrics_lin_weights() -> Path:
    """The LPIPS v0.1 VGG linear-layer weights inside the installed torchmetrics package."""
    return Path(str(files("torchmetrics.functional.image") / "lpips_models" / "vgg.pth"))


def _vgg_trunk(pooling: str) -> nn.Sequential:
    """torchvision's VGG16 convolutions up to relu5_3, with max or (piq's replace_pooling) average pooling."""
    if pooling not in ("avg", "max"):
        raise ConfigError(
            f"model.objective.distance.pooling={pooling!r}: use 'avg' (the CM authors' piq LPIPS) "
            "or 'max' (the original LPIPS)"
        )
    trunk = make_layers(cfgs["D"])[: _TAPS[-1] + 1]
    if pooling == "avg":
        for i, layer in enumerate(trunk):
            if isinstance(layer, nn.MaxPool2d):
                trunk[i] = nn.AvgPool2d(kernel_size=2, stride=2)
    return trunk


class LPIPS(nn.Module):
    def __init__(
        self,
        lin_weights: str | None = None,
        vgg_weights: str = "~/.cache/torch/hub/checkpoints/vgg16-397923af.pth",
        resize_to: int = 224,
        pooling: str = "max",
    ):
        super().__init__()
        # Only the convolutional trunk is built and read; the 120M-parameter classifier is never needed.
        self.features = _vgg_trunk(pooling)
        vgg = _load(
            vgg_weights,
            "VGG16 weights",
            "Set model.objective.distance.vgg_weights to torchvision's vgg16-397923af.pth.",
        )
        self.features.load_state_dict({k[len("features.") :]: v for k, v in vgg.items() if k.startswith("features.")})
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        lin = _load(
            lin_weights or torchmetrics_lin_weights(),
            "linear-layer weights",
            "Set model.objective.distance.lin_weights to LPIPS v0.1 vgg.pth (null: the copy torchmetrics ships).",
        )
        for i, conv in enumerate(self.lins):
            conv.weight.data.copy_(lin[f"lin{i}.model.1.weight"])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.resize_to = resize_to
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] < self.resize_to:
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear", align_corners=False)
        h = (x - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                taps.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], shape (B, C, H, W) with C = 1 or 3; returns (B,)."""
        return sum(
            lin((a - b).pow(2)).mean(dim=(1, 2, 3)) for lin, a, b in zip(self.lins, self._taps(x), self._taps(y))
        )
