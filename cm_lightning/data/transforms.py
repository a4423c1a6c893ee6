"""Image loading shared by the file-based datasets: resize the short side, centre-crop, map to [-1, 1]."""

import torch
from PIL import Image
from torchvision.transforms import functional as TF


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Resize so the short side is ``size`` (bicubic, antialiased), then centre-crop to size x size."""
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    return TF.center_crop(img, [size, size])


def to_model_range(img: Image.Image, channels: int) -> torch.Tensor:
    img = img.convert("L" if channels == 1 else "RGB")
    return TF.to_tensor(img) * 2 - 1
