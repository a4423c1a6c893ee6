"""A trained generator reduced to what sampling needs: a backbone and its parameterisation.

Built by the LightningModules (from their EMA weights) and by evaluate.py (from a checkpoint), so
that samples in training and in evaluation come from the same code.
"""

from dataclasses import dataclass

import torch
from torch import nn

from cm_lightning.diffusion.flow_map import CHAINS, flow_map_sample
from cm_lightning.diffusion.parameterisation import Parameterisation
from cm_lightning.diffusion.sampling import (
    TEACHER_STEPS,
    check_decreasing,
    multistep_sample,
    ode_sample,
    sigmas_from_indices,
)
from cm_lightning.errors import ConfigError
from cm_lightning.runtime.speed import Speed, amp_dtype, autocast


@dataclass
class Sampler:
    net: nn.Module
    parameterisation: (
        Parameterisation  # a consistency function (CM Algorithm 1) or a denoiser (an ODE solver samples it)
    )
    amp: torch.dtype | None = None  # autocast dtype of the network evaluations; None: fp32
    cuda_graphs: bool = False
    decoder: object = None  # latent/autoencoder.py: samples are latents, returned decoded to pixels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.net.in_channels, self.net.image_size, self.net.image_size)

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """The shape of the images ``__call__`` returns: the decoder's pixels for a latent model."""
        if self.decoder is None:
            return self.image_shape
        size = self.net.image_size * self.decoder.factor
        return (self.decoder.image_channels, size, size)

    @property
    def num_classes(self) -> int:
        return getattr(self.net, "num_classes", 0)

    def denoise(self, x, sigma, labels=None):
        if self.cuda_graphs:
            # Each evaluation is a new step for CUDA graph trees: the previous output has been consumed.
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(x.device, self.amp):
            return self.parameterisation(self.net, x, sigma, labels)  # fp32 out

    def jump(self, x, r, t, labels=None):
        """MeanFlow's z_r from z_t (``parameterisation.jump``), under the same speed settings as ``denoise``."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(x.device, self.amp):
            return self.parameterisation.jump(self.net, x, r, t, labels)

    def speed_up(self, speed: Speed, precision: str, device) -> "Sampler":
        """Autocast in ``precision``'s dtype, channels-last and compilation in ``speed.sample_compile_mode``
        (``reduce-overhead``: CUDA graphs) as ``speed`` resolves on ``device``."""
        speed = speed.resolved(torch.device(device))
        speed.prepare(self.net, mode=speed.sample_compile_mode)
        self.amp = amp_dtype(precision)
        self.cuda_graphs = (
            bool(speed.compile)
            and torch.device(device).type == "cuda"
            and (speed.sample_compile_mode in ("reduce-overhead", "max-autotune"))
        )
        return self

    def labels(self, num: int, generator: torch.Generator):
        if not self.num_classes:
            return None
        return torch.randint(0, self.num_classes, (num,), generator=generator, device=generator.device)

    def at_sigmas(self, sigmas) -> dict:
        """The plan of explicit EDM noise levels, as the parameterisation's own (TrigFlow: arctan(sigma / sigma_d))."""
        return dict(sigmas=[self.parameterisation.from_sigma(s) for s in sigmas])

    def plans(
        self, steps=(1, 2), sigmas: dict | None = None, teacher_steps=(TEACHER_STEPS,), solver: str = "heun"
    ) -> dict:
        """Named sampling plans. A consistency model: ``k``-step sampling for each k in ``steps``, then one plan
        per entry of ``sigmas`` ({name: decreasing EDM noise levels}); a MeanFlow model's flow-map default also
        gets ``{k}step_renoise``, the re-noising chain, for each k > 1. A denoiser: its ODE sampler with each of
        ``teacher_steps`` steps of ``solver``."""
        if not self.parameterisation.few_step:
            return {f"{int(k)}step": dict(steps=int(k), solver=solver) for k in teacher_steps}
        named = {f"{int(k)}step": dict(steps=int(k)) for k in steps}
        if getattr(self.parameterisation, "chain", "renoise") == "flow_map":
            named |= {f"{int(k)}step_renoise": dict(steps=int(k), chain="renoise") for k in steps if int(k) > 1}
        return named | {name: self.at_sigmas(levels) for name, levels in (sigmas or {}).items()}

    def requested(self, sigmas=None, ts=None, ts_num_scales=None, steps=None, solver=None, model: str = "") -> dict:
        """The plans a user asks for: explicit EDM ``sigmas`` inside the model's noise range, the authors' ``ts``
        indices into a grid of ``ts_num_scales`` points, or ``steps`` (None: the model's default); ``model`` names
        the model in the errors, e.g. ``ckpt=PATH``."""
        if not self.parameterisation.few_step and (sigmas is not None or ts is not None):
            raise ConfigError(
                f"sigmas= and ts= set the levels of consistency sampling, but {model} is a diffusion "
                "denoiser; drop them and use steps= and solver="
            )
        if self.parameterisation.few_step and solver is not None:
            raise ConfigError(
                f"solver={solver} applies to diffusion teachers, but {model} is a consistency "
                "model sampled by CM Algorithm 1; drop solver="
            )
        grid = self.parameterisation.grid
        if sigmas is not None:
            return self.plans((), {"sigmas": check_decreasing(sigmas, "sigmas", grid["sigma_min"], grid["sigma_max"])})
        if ts is not None:
            return self.plans((), {"ts" + "-".join(str(t) for t in ts): sigmas_from_indices(ts, ts_num_scales, **grid)})
        steps = None if steps is None else list(steps)
        if steps is None:
            return self.plans(solver=solver or "heun")
        return self.plans(steps, teacher_steps=steps, solver=solver or "heun")

    def nfe(self, how: dict) -> int:
        """Network evaluations per sample: k for k consistency steps, 2n - 1 for n Heun steps, n for Euler."""
        if not self.parameterisation.few_step:
            return 2 * how["steps"] - 1 if how.get("solver", "heun") == "heun" else how["steps"]
        return len(how["sigmas"]) if how.get("sigmas") is not None else how["steps"]

    @torch.no_grad()
    def __call__(
        self,
        num: int,
        steps: int | None = None,
        sigmas=None,
        labels=None,
        seed: int = 0,
        device="cpu",
        solver: str = "heun",
        chain: str | None = None,
    ):
        """``num`` images in [-1, 1] and their labels (None when unconditional).

        Consistency models take ``steps`` (default 1) or explicit decreasing levels ``sigmas`` (the
        parameterisation's own: sigma for EDM/CM, t for TrigFlow); denoisers take ``steps`` of the ODE
        ``solver`` (default ``TEACHER_STEPS`` Heun steps). ``chain`` (few-step models): ``flow_map`` (MeanFlow's
        jumps) or ``renoise`` (CM Algorithm 1); None: the parameterisation's own (its ``chain``, else renoise).
        """
        chain = chain or getattr(self.parameterisation, "chain", "renoise")
        if chain not in CHAINS or (chain == "flow_map" and not hasattr(self.parameterisation, "jump")):
            raise ConfigError(
                f"chain={chain!r}: use renoise, or flow_map with a MeanFlow model (its parameterisation's jumps)"
            )
        g = torch.Generator(device=device).manual_seed(seed)
        z = torch.randn((num, *self.image_shape), generator=g, device=device)
        labels = self.labels(num, g) if labels is None else labels.to(device)
        f = lambda x, s: self.denoise(x, s, labels)  # noqa: E731
        return self.pixels(self.latents(z, labels, f, g, steps, sigmas, solver, chain)), labels

    def latents(self, z, labels, f, g, steps, sigmas, solver, chain):
        """The network's samples: images, or latents for a model trained on an autoencoder's latents. Only images
        are clamped to [-1, 1], as the authors clamp them; latents range wider (SD's scaled ones beyond +-4)."""
        clip = self.decoder is None
        if not self.parameterisation.few_step:
            return ode_sample(
                f, z, steps=steps or TEACHER_STEPS, solver=solver, clip=clip, **self.parameterisation.grid
            )
        levels = self.parameterisation.levels(steps or 1) if sigmas is None else sigmas
        if chain == "flow_map":
            start = self.parameterisation.add_noise(torch.zeros_like(z), z, levels[0])
            return flow_map_sample(lambda x, r, t: self.jump(x, r, t, labels), start, levels, clip=clip)
        return multistep_sample(f, z, levels, self.parameterisation, generator=g, clip=clip)

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Samples as images in [-1, 1]: latents go through the decoder."""
        return x if self.decoder is None else self.decoder.to(x.device).decode(x)
