"""Improved MeanFlow (iMF; Geng, Lu, Wu, Shechtman, Kolter & He 2025, "Improved Mean Flows: On the Challenges of
Fastforward Generative Models", arXiv:2512.02012, Section 4.1 and Algorithm 1): the objective of its boundary
variant. MeanFlow's loss (``meanflow.py``) is a loss on the instantaneous velocity, re-parameterised by the
average-velocity network u (iMF eqs. 9-10):

    V_theta = u_theta(z_t, r, t) + (t - r) sg(du_theta/dt);   ||V_theta - v||^2 = ||u_theta - sg(u_tgt)||^2

with du/dt taken along the conditional velocity v = e - x, so that the prediction V_theta depends on e - x as
well as on z_t. iMF takes the derivative along the network's own instantaneous velocity instead, which the
boundary condition u(z_t, t, t) = v(z_t, t) gives without another head:

    V_theta(z_t) = u_theta(z_t, r, t) + (t - r) sg(JVP(u_theta; v_theta)),  v_theta = sg u_theta(z_t, t, t)  (eq. 12)

a function of z_t alone, regressed on the fixed target v = e - x with MeanFlow's adaptive weight
1 / sg(||V_theta - v||^2 + c)^p. At r = t it is flow matching, as in MeanFlow. v_theta is the JVP's own function
u(z_t, ., .) at r = t (the step's dropout masks, no graph), one more forward of the net per step.

Everything else is MeanFlow's: the (t, r) sampler, the adaptive weight, the parameterisation and its samplers,
and the folded guidance, whose omega = 1, kappa = 1 - 1/w is iMF's guided target v + (1 - 1/w)(v_c - v_u) at a
fixed scale w, with the net's u(z_t, t, t) for v_c and v_u. Not here (docs/dit-meanflow.md#improved-meanflow):
the auxiliary v-head, the guidance scale and interval as network inputs, the in-context conditioning DiT.
"""

import torch

from cm_lightning.diffusion.objectives.base import StepContext
from cm_lightning.diffusion.objectives.meanflow import MeanFlow


class ImprovedMeanFlow(MeanFlow):
    """MeanFlow (every option as there) whose du/dt follows the net's own velocity u(z_t, t, t) (iMF eq. 12).
    Defaults: iMF's ImageNet values (official code, configs/default.py): r != t for half the samples
    (data_proportion 0.5), c = 0.01 (norm_eps), with MeanFlow's logit-normal(-0.4, 1.0) and p = 1."""

    def __init__(self, parameterisation, fraction: float = 0.5, norm_c: float = 0.01, **options):
        super().__init__(parameterisation, fraction=fraction, norm_c=norm_c, **options)

    def tangent(self, u_fn, z: torch.Tensor, t: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """v_theta(z_t, t) = u_theta(z_t, t, t): the boundary condition of the average velocity (iMF eq. 12)."""
        ctx.reseed_dropout()
        with torch.no_grad():
            return u_fn(z, t, t)
