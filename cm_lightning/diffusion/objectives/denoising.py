"""The EDM teacher's loss (Karras et al. 2022, eq. 2 with Table 1's choices)."""

import torch

from cm_lightning.diffusion.objectives.base import Objective, StepContext
from cm_lightning.errors import ConfigError


class Denoising(Objective):
    """loss = lambda(sigma) ||D(x0 + sigma z, sigma) - x0||^2 / dim,  ln sigma ~ N(P_mean, P_std^2),
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""

    def __init__(self, parameterisation, p_mean: float = -1.2, p_std: float = 1.2):
        super().__init__(parameterisation)
        if not p_std > 0:
            raise ConfigError(f"model.objective.p_std={p_std}: the lognormal's standard deviation must be positive")
        self.p_mean, self.p_std = p_mean, p_std

    def denoise(self, student, x0, labels, ctx: StepContext):
        """(sigma, lambda(sigma), D(x0 + sigma z, sigma)) for a batch: the draw both EDM losses share."""
        g, shape = ctx.generator, x0.shape
        n, z = ctx.draw(
            shape[0],
            lambda b: (
                torch.randn(b, generator=g, device=g.device),
                torch.randn((b, *shape[1:]), generator=g, device=g.device),
            ),
        )
        sigma, sigma_data = torch.exp(self.p_mean + self.p_std * n), self.parameterisation.sigma_data
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        ctx.reseed_dropout()
        return sigma, weight, self.parameterisation(student, x0 + sigma.view(-1, 1, 1, 1) * z, sigma, labels)

    def loss(self, student, target_net, x0, labels, ctx: StepContext):
        _, weight, denoised = self.denoise(student, x0, labels, ctx)
        return weight * (denoised - x0).pow(2).flatten(1).mean(dim=1), {}
