"""The EDM teacher (Karras et al. 2022): denoising score matching with lognormal noise levels."""

import torch

from cm_lightning.diffusion.precond import edm_denoiser
from cm_lightning.modules.base import GenerativeModule


class EDMModule(GenerativeModule):
    """loss = lambda(sigma) ||D(x0 + sigma z, sigma) - x0||^2,  ln sigma ~ N(P_mean, P_std^2),
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2  (EDM, Table 1)."""

    kind = "edm"

    def __init__(self, net, optimizer, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5,
                 noise_kind: str = "adm", **kwargs):
        if not p_std > 0:
            raise ValueError(f"model.p_std={p_std}: the lognormal's standard deviation must be positive")
        super().__init__(net, edm_denoiser(sigma_data, noise_kind), optimizer, **kwargs)
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data

    def losses(self, x0, labels, batch_idx: int) -> torch.Tensor:
        g = self.step_generator(batch_idx)
        shape = x0.shape
        n, z = self.global_draw(shape[0], lambda b: (
            torch.randn(b, generator=g, device=self.device),
            torch.randn((b, *shape[1:]), generator=g, device=self.device),
        ))
        sigma = torch.exp(self.p_mean + self.p_std * n)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        self.seed_dropout(batch_idx)
        denoised = self.precond(self.net, x0 + sigma.view(-1, 1, 1, 1) * z, sigma, self.labels_for(labels))
        return weight * (denoised - x0).pow(2).flatten(1).mean(dim=1)

    def training_step(self, batch, batch_idx):
        loss = self.losses(*batch, batch_idx).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.losses(*batch, batch_idx).mean(), sync_dist=True)
