"""PNG grids of samples from the EMA weights, at every validation and at the end of training."""

import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torchvision.utils import make_grid, save_image

from cm_lightning.diffusion.sampling import TEACHER_STEPS, check_decreasing
from cm_lightning.runtime import atomic


def image_grid(images: torch.Tensor) -> torch.Tensor:
    """A (C, H, W) grid in [0, 1] of images in [-1, 1], as square as possible."""
    return make_grid(
        (images.float().cpu() + 1) / 2, nrow=math.ceil(math.sqrt(images.shape[0])), padding=1, pad_value=1.0
    ).clamp(0, 1)


class SampleGrid(L.Callback):
    """Saves ``samples/<tag>_<k>step.png`` under the run directory and sends it to the logger.

    Consistency models are sampled with each of ``steps`` (or each explicit list in ``sigmas``),
    the EDM teacher with ``teacher_steps`` Heun steps. The noise is fixed by ``seed`` so that grids
    of successive validations are comparable.
    """

    def __init__(self, num: int = 64, steps=(1, 2), sigmas=None, teacher_steps: int | None = None, seed: int = 0):
        self.num, self.steps, self.teacher_steps, self.seed = num, list(steps), teacher_steps or TEACHER_STEPS, seed
        self.sigmas = {
            f"sigmas{i}": check_decreasing(s, "callbacks.sample_grid.sigmas entry") for i, s in enumerate(sigmas or [])
        }

    @torch.no_grad()
    def write(self, trainer: L.Trainer, module, tag: str) -> list[Path]:
        if not trainer.is_global_zero:
            return []
        sampler = module.sampler()
        out = Path(trainer.default_root_dir) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, how in sampler.plans(self.steps, self.sigmas, [self.teacher_steps]).items():
            images, _ = sampler(self.num, seed=self.seed, device=module.device, **how)
            grid = image_grid(images)
            path = out / f"{tag}_{name}.png"
            with atomic.replacing(path) as tmp:
                save_image(grid, tmp, format="png")
            paths.append(path)
            self.log_image(trainer, f"samples/{name}", grid)
        return paths

    @staticmethod
    def log_image(trainer: L.Trainer, key: str, grid: torch.Tensor) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[grid], step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(key, grid, global_step=trainer.global_step)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.write(trainer, pl_module, f"step{trainer.global_step:07d}")

    def on_train_end(self, trainer, pl_module):
        self.write(trainer, pl_module, "final")
