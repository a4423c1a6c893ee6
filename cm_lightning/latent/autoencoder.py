"""A VAE read from a local folder in diffusers' layout (config.json + diffusion_pytorch_model.safetensors),
the layout of stabilityai/sd-vae-ft-{mse,ema} and of the embedded digits VAE: nothing is downloaded and no
pickle is read (safetensors holds only tensors)."""

import hashlib
import json
from pathlib import Path

import torch

from cm_lightning.errors import ConfigError

WEIGHTS = "diffusion_pytorch_model.safetensors"
DIGITS_VAE = Path(__file__).parent / "digits_vae"


def resolve(folder) -> Path:
    """``digits`` names the embedded VAE; anything else is a path."""
    return DIGITS_VAE if str(folder) == "digits" else Path(str(folder)).expanduser()


def check_folder(folder: Path) -> None:
    fix = "point autoencoder.path at a folder holding config.json and " + WEIGHTS + " (diffusers' save_pretrained)"
    if not folder.is_dir():
        raise ConfigError(f"autoencoder.path={folder} is not a folder; {fix}")
    if not (folder / WEIGHTS).is_file():
        pickled = any(folder.glob("*.bin")) or any(folder.glob("*.ckpt"))
        what = (
            "holds only pickled weights (.bin/.ckpt), which this project does not unpickle"
            if pickled
            else (f"has no {WEIGHTS}")
        )
        raise ConfigError(f"autoencoder.path={folder} {what}; {fix}")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"autoencoder.path={folder} has no config.json; {fix}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class Autoencoder:
    """diffusers' ``AutoencoderKL`` with a scaling (``latent/scaling.py``): ``encode`` gives the rows a cache
    stores, ``decode`` turns training latents back into images in [-1, 1]; both batched, bf16 autocast on a GPU."""

    def __init__(self, path, scaling, batch_size: int = 64):
        from diffusers import AutoencoderKL  # the optional extra cm-lightning[latent]

        self.folder = resolve(path)
        check_folder(self.folder)
        config = json.loads((self.folder / "config.json").read_text())
        if config.get("_class_name") not in (None, "AutoencoderKL"):
            raise ConfigError(f"autoencoder.path={self.folder} holds a {config['_class_name']}; use an AutoencoderKL")
        self.vae = AutoencoderKL.from_pretrained(
            self.folder, local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False
        ).eval()
        self.vae.requires_grad_(False)
        self.scaling, self.batch_size = scaling, batch_size
        self.latent_channels = self.vae.config.latent_channels
        self.image_channels = self.vae.config.in_channels
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self._digest = None

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = sha256(self.folder / WEIGHTS)
        return self._digest

    def describe(self) -> dict:
        """What a cache's manifest and a checkpoint need to tell this VAE and scaling from any other."""
        return {"weights_sha256": self.digest, "scaling": self.scaling.describe(), "factor": self.factor}

    def check_image_size(self, image_size: int) -> None:
        if image_size % self.factor:
            raise ConfigError(
                f"data.image_size={image_size} is not divisible by the VAE's downsampling factor {self.factor}; "
                f"use a multiple of {self.factor}"
            )

    def to(self, device) -> "Autoencoder":
        self.vae.to(device)
        return self

    def _autocast(self, device: torch.device):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> the scaling's stored rows (fp32)."""
        device = next(self.vae.parameters()).device
        rows = []
        for batch in images.split(self.batch_size):
            with self._autocast(device):
                post = self.vae.encode(batch.to(device)).latent_dist
            rows.append(self.scaling.stored(post.mean.float(), post.std.float(), generator).cpu())
        return torch.cat(rows)

    @torch.no_grad()
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> training latents of the posterior mean, on the images' device: the deterministic
        encoding (the VAE's best reconstruction, no posterior noise) that editing keeps as its reference."""
        device = next(self.vae.parameters()).device
        out = []
        for batch in images.split(self.batch_size):
            with self._autocast(device):
                mean = self.vae.encode(batch.to(device)).latent_dist.mean
            out.append(self.scaling.from_vae(mean.float()).to(images.device))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Training latents -> images in [-1, 1], on the latents' device."""
        device = next(self.vae.parameters()).device
        out = []
        for batch in latents.split(self.batch_size):
            with self._autocast(device):
                x = self.vae.decode(self.scaling.to_vae(batch.float()).to(device)).sample
            out.append(x.float().clamp(-1, 1).to(latents.device))
        return torch.cat(out)
