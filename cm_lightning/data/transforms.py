"""Image loading shared by the file-based datasets: resize the short side and centre-crop (plainly, or as ADM
does), map to [-1, 1]."""

import warnings

import torch
from PIL import Image
from torchvision.transforms import functional as TF


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Resize so the short side is ``size`` (bicubic, antialiased), then centre-crop to size x size."""
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    return TF.center_crop(img, [size, size])


def adm_center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM's ``center_crop_arr`` (the CM, DiT and EDM2 dataset tools crop ImageNet and LSUN with it): halve with a
    BOX filter while the short side is at least 2 x size, resize bicubically so the short side is ``size``, then
    crop the centre (offsets rounded down)."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


CROPS = {"resize": center_crop_resize, "adm": adm_center_crop}


def to_model_range(img: Image.Image, channels: int) -> torch.Tensor:
    img = img.convert("L" if channels == 1 else "RGB")
    return TF.to_tensor(img) * 2 - 1


def header_problem(file) -> str | None:
    """Why an image file cannot be used, from its header alone (no pixel is decoded): not an image, or more
    pixels than PIL's decompression-bomb limit ``Image.MAX_IMAGE_PIXELS`` (89,478,485 by default)."""
    try:
        with warnings.catch_warnings():  # PIL warns between 1x and 2x the limit: refused below instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as img:
                width, height = img.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"not a readable image ({exc})"
    if width * height > Image.MAX_IMAGE_PIXELS:
        return f"{width} x {height} pixels, more than the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS}"
    return None


def decode_problem(file) -> str | None:
    """``header_problem``, then why the pixels do not decode (a file cut short passes the header check and
    would otherwise stop training mid-run in a data-loader worker), or None."""
    problem = header_problem(file)
    if problem:
        return problem
    try:
        with Image.open(file) as img:
            img.load()
    except (OSError, ValueError, SyntaxError) as exc:
        return f"its pixels do not decode ({exc})"
    return None
