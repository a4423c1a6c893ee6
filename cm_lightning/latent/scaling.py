"""The two published ways from a VAE posterior to the latents a network is trained on.

``stored`` is what the cache keeps per image, ``read`` turns a stored row into a training latent (drawing
fresh noise where the convention samples at every read), ``from_vae`` scales one raw VAE latent (editing
encodes the posterior mean through it) and ``to_vae`` inverts it before decoding."""

import torch

# NVlabs/edm2 training/encoders.py (StabilityVAEEncoder): per-channel statistics of sd-vae-ft-mse latents.
EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)


class ConstantScaling:
    """DiT / SiT / MeanFlow: latent = 0.18215 x one posterior sample, drawn once when the cache is built."""

    def __init__(self, factor: float = 0.18215):
        self.factor = factor

    def stored_channels(self, latent_channels: int) -> int:
        return latent_channels

    def stored(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None):
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.from_vae(mean + std * eps)

    def read(self, row: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return row

    def from_vae(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * self.factor

    def to_vae(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.factor

    def describe(self) -> dict:
        return {"kind": "constant", "factor": self.factor}


class EDM2Scaling:
    """EDM2 / sCM-512: the cache keeps the posterior's mean and std (2C channels); every read samples
    z = mean + std * eps and normalises per channel, x = (z - raw_mean) * final_std / raw_std (final std 0.5)."""

    def __init__(self, raw_mean=EDM2_RAW_MEAN, raw_std=EDM2_RAW_STD, final_std: float = 0.5):
        self.raw_mean, self.raw_std, self.final_std = list(raw_mean), list(raw_std), final_std

    def _stats(self, like: torch.Tensor):
        shape = (len(self.raw_mean), 1, 1)
        mean = torch.tensor(self.raw_mean, dtype=like.dtype, device=like.device).view(shape)
        return mean, torch.tensor(self.raw_std, dtype=like.dtype, device=like.device).view(shape)

    def stored_channels(self, latent_channels: int) -> int:
        return 2 * latent_channels

    def stored(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None):
        return torch.cat([mean, std], dim=-3)

    def read(self, row: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, std = row.float().chunk(2, dim=-3)
        return self.from_vae(mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype))

    def from_vae(self, latent: torch.Tensor) -> torch.Tensor:
        raw_mean, raw_std = self._stats(latent)
        return (latent - raw_mean) * (self.final_std / raw_std)

    def to_vae(self, latent: torch.Tensor) -> torch.Tensor:
        raw_mean, raw_std = self._stats(latent)
        return latent * (raw_std / self.final_std) + raw_mean

    def describe(self) -> dict:
        return {"kind": "edm2", "raw_mean": self.raw_mean, "raw_std": self.raw_std, "final_std": self.final_std}
