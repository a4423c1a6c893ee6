"""The TrigFlow diffusion loss, sCM's pretraining (Lu & Song 2025, Section 3, the TrigFlow diffusion objective):

    t = arctan(exp(tau) / sigma_d), tau ~ N(P_mean, P_std^2);  x_t = cos(t) x0 + sin(t) z,  z ~ N(0, sigma_d^2 I)
    v_t = dx_t/dt = cos(t) z - sin(t) x0
    loss = exp(w(t)) / D * ||sigma_d F_theta(x_t / sigma_d, t) - v_t||^2 - w(t)

with c_noise(t) = t (TrigFlow's ``noise_kind=t``) and w sCM's learned weighting, which starts at zero. Its F is
the F that sCT and sCD learn, so a student initialised from it starts as the same function (Algorithm 1's
theta <- theta_pretrain).
"""

import torch

from cm_lightning.diffusion.objectives.base import Objective, StepContext
from cm_lightning.diffusion.objectives.scm import LearnedWeighting
from cm_lightning.diffusion.shapes import per_sample
from cm_lightning.diffusion.trigflow import TrigFlow, draw_times
from cm_lightning.errors import ConfigError


class TrigFlowDenoising(Objective):
    """The TrigFlow teacher. ``p_mean``, ``p_std``: tau's normal; ``weighting_channels``: w(t)'s embedding
    width, 0 for the unweighted loss."""

    def __init__(self, parameterisation: TrigFlow, p_mean: float = -1.0, p_std: float = 1.4, weighting_channels=128):
        super().__init__(parameterisation)
        if not isinstance(parameterisation, TrigFlow) or parameterisation.noise_kind != "t":
            raise ConfigError(
                "model.objective.parameterisation must be TrigFlow with noise_kind=t for the TrigFlow teacher "
                "(model/objective/parameterisation=trigflow)"
            )
        if not (isinstance(p_std, (int, float)) and 0 < p_std <= 10 and isinstance(p_mean, (int, float))):
            raise ConfigError(f"model.objective p_mean={p_mean!r}, p_std={p_std!r}: numbers, p_std in (0, 10]")
        self.p_mean, self.p_std = p_mean, p_std
        self.weighting = LearnedWeighting(weighting_channels) if weighting_channels else None

    def loss(self, student, target_net, x0, labels, ctx: StepContext):
        parameterisation = self.parameterisation
        sigma_data = parameterisation.sigma_data
        t, z, x_t = draw_times(parameterisation, self.p_mean, self.p_std, x0, ctx)
        v_t = per_sample(torch.cos(t), x0) * sigma_data * z - per_sample(torch.sin(t), x0) * x0
        ctx.reseed_dropout()
        distance = (sigma_data * parameterisation.F(student, x_t, t, labels) - v_t).pow(2).flatten(1).mean(dim=1)
        if self.weighting is None:
            return distance, {}
        w = self.weighting(t)
        return torch.exp(w) * distance - w, {"weight": torch.exp(w).mean().detach()}
