"""MeanFlow's own few-step sampler (Geng et al. 2025, eq. 4 and Algorithm 2): jumps of the average velocity,

    z_r = z_t - (t - r) u(z_t, r, t),

along decreasing times t_1 > t_2 > ... > t_k and then to r = 0, one network evaluation per jump and no fresh
noise. It is exact for the true average velocity at any k, which the consistency models' denoise-and-re-noise
chain (CM Algorithm 1, ``sampling.consistency_chain``) is not: that one forgets the state's noise at each step.
"""

import torch

from cm_lightning.diffusion.sampling import check_decreasing

# How a few-step sampler moves between levels: MeanFlow's jumps, or CM Algorithm 1's denoise and re-noise.
CHAINS = ("flow_map", "renoise")


@torch.no_grad()
def flow_map_sample(jump, x: torch.Tensor, levels, clip: bool = True) -> torch.Tensor:
    """``jump(x, r, t)`` = z_r from z_t (per-sample r, t of shape (B,)) applied from ``x`` at levels[0] through
    the later levels down to 0; only the final image is clamped to [-1, 1], since the states between are noisy."""
    levels = check_decreasing(levels)
    ones = torch.ones(x.shape[0], device=x.device)
    for t, r in zip(levels, [*levels[1:], 0.0]):
        x = jump(x, r * ones, t * ones)
    return x.clamp(-1, 1) if clip else x
