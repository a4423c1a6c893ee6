"""A trained generator reduced to what sampling needs: a backbone, its preconditioning, and the grid.

Built by the LightningModules (from their EMA weights) and by evaluate.py (from a checkpoint), so
that samples in training and in evaluation come from the same code.
"""

from dataclasses import dataclass

import torch
from torch import nn

from cm_lightning.diffusion.precond import Precond
from cm_lightning.diffusion.sampling import default_multistep_sigmas, multistep_sample, ode_sample
from cm_lightning.speed import Speed, amp_dtype, autocast


@dataclass
class Sampler:
    net: nn.Module
    precond: Precond
    kind: str  # "consistency" (f_theta, CM Algorithm 1) or "edm" (denoiser, ODE solver)
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    amp: torch.dtype | None = None  # autocast dtype of the network evaluations; None: fp32
    cuda_graphs: bool = False

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.net.in_channels, self.net.image_size, self.net.image_size)

    @property
    def num_classes(self) -> int:
        return getattr(self.net, "num_classes", 0)

    def denoise(self, x, sigma, labels=None):
        if self.cuda_graphs:
            # Each evaluation is a new step for CUDA graph trees: the previous output has been consumed.
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(x.device, self.amp):
            return self.precond(self.net, x, sigma, labels)  # fp32 out: c_skip * x + c_out * F

    def speed_up(self, speed: Speed, precision: str, device) -> "Sampler":
        """Autocast in ``precision``'s dtype, channels-last and compilation in ``speed.sample_compile_mode``
        (``reduce-overhead``: CUDA graphs) as ``speed`` resolves on ``device``."""
        speed = speed.resolved(torch.device(device))
        speed.prepare(self.net, mode=speed.sample_compile_mode)
        self.amp = amp_dtype(precision)
        self.cuda_graphs = bool(speed.compile) and torch.device(device).type == "cuda" and (
            speed.sample_compile_mode in ("reduce-overhead", "max-autotune"))
        return self

    def labels(self, num: int, generator: torch.Generator):
        if not self.num_classes:
            return None
        return torch.randint(0, self.num_classes, (num,), generator=generator, device=generator.device)

    @torch.no_grad()
    def __call__(self, num: int, steps: int | None = None, sigmas=None, labels=None, seed: int = 0,
                 device="cpu", solver: str = "heun"):
        """``num`` images in [-1, 1] and their labels (None when unconditional).

        Consistency models take ``steps`` (default 1) or explicit decreasing ``sigmas``; EDM models
        take ``steps`` of the ODE ``solver`` (default 18 Heun steps, 35 evaluations).
        """
        g = torch.Generator(device=device).manual_seed(seed)
        z = torch.randn((num, *self.image_shape), generator=g, device=device)
        labels = self.labels(num, g) if labels is None else labels.to(device)
        f = lambda x, s: self.denoise(x, s, labels)  # noqa: E731
        grid = dict(sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho)
        if self.kind == "edm":
            return ode_sample(f, z, steps=steps or 18, solver=solver, **grid), labels
        if sigmas is None:
            sigmas = default_multistep_sigmas(steps or 1, **grid)
        return multistep_sample(f, z, sigmas, sigma_min=self.sigma_min, generator=g), labels
