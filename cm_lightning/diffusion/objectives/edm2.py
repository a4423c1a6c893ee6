"""The EDM2 teacher's loss with a learned uncertainty (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", eqs. 14-16 and 21; NVlabs/edm2 ``EDM2Loss``)."""

import torch

from cm_lightning.diffusion.objectives.base import StepContext
from cm_lightning.diffusion.objectives.denoising import Denoising
from cm_lightning.diffusion.parameterisation import c_noise
from cm_lightning.errors import ConfigError
from cm_lightning.nets.magnitude_preserving import MPConv, MPFourier


class EDM2Denoising(Denoising):
    """loss = lambda(sigma) / exp(u(sigma)) ||D(x0 + sigma z, sigma) - x0||^2 / dim + u(sigma),
    ln sigma ~ N(P_mean, P_std^2), lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.

    u(sigma) is the log-variance of the loss at that noise level, learned jointly (a one-output MP layer on MP
    Fourier features of ln(sigma) / 4), so that every level contributes equally to the gradient (eq. 21). The
    official loss sums over pixels and this one averages: Adam is invariant to the constant factor dim.
    ``logvar_fourier`` and ``logvar_linear`` carry the official names, so released weights map onto them."""

    def __init__(self, parameterisation, p_mean: float = -0.4, p_std: float = 1.0, logvar_channels: int = 128):
        super().__init__(parameterisation, p_mean, p_std)  # EDM2: P (-0.4, 1.0) on ImageNet 512, (-0.8, 1.6) on 64
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, ())

    def check(self, net) -> None:
        """EDM2's recipe (its learning rates, no weight decay) assumes forced weight normalisation, which lives
        in the magnitude-preserving layers: a net without them would train with weights that grow unchecked."""
        if not any(isinstance(m, MPConv) for m in net.modules()):
            raise ConfigError(
                f"model=edm2 trains with EDM2's forced weight normalisation, but {type(net).__name__} has no "
                "magnitude-preserving layers; use net=edm2_* (or model=edm for this net)"
            )

    def uncertainty(self, sigma: torch.Tensor) -> torch.Tensor:
        """u(sigma), per sample, fed EDM2's c_noise = ln(sigma) / 4 whatever the net's conditioning."""
        return self.logvar_linear(self.logvar_fourier(c_noise(sigma.float(), "edm"))).squeeze(-1)

    def loss(self, student, target_net, x0, labels, ctx: StepContext):
        sigma, weight, denoised = self.denoise(student, x0, labels, ctx)
        u = self.uncertainty(sigma)
        error = (denoised - x0).pow(2).flatten(1).mean(dim=1)
        return weight / torch.exp(u) * error + u, {"logvar": u.mean().detach()}
