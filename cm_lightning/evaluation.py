"""``python evaluate.py ckpt=PATH``: samples from a trained checkpoint."""

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torchvision.utils import save_image

from cm_lightning.callbacks.sample_grid import image_grid
from cm_lightning.checkpoints import sampler_from_checkpoint
from cm_lightning.diffusion.sampling import check_decreasing, sigmas_from_indices
from cm_lightning.errors import ConfigError
from cm_lightning.sampler import Sampler

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images (N, C, H, W) to the authors' uint8 (N, H, W, C) layout."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def schedules(cfg: DictConfig, sampler: Sampler) -> dict:
    """Named sampling plans: explicit sigmas, the authors' ts indices, or step counts."""
    if cfg.sigmas is not None:
        return {"sigmas": dict(sigmas=check_decreasing(cfg.sigmas, "sigmas"))}
    if cfg.ts is not None:
        sigmas = sigmas_from_indices(cfg.ts, cfg.ts_num_scales, sampler.sigma_min, sampler.sigma_max, sampler.rho)
        return {"ts" + "-".join(str(t) for t in cfg.ts): dict(sigmas=sigmas)}
    if sampler.kind == "edm":
        steps = [18] if list(cfg.steps) == [1, 2] else list(cfg.steps)
        return {f"{k}step": dict(steps=int(k), solver=cfg.solver) for k in steps}
    return {f"{k}step": dict(steps=int(k)) for k in cfg.steps}


def sample_batched(sampler: Sampler, num: int, batch_size: int, seed: int, device, **how):
    images, labels = [], []
    for i, start in enumerate(range(0, num, batch_size)):
        x, y = sampler(min(batch_size, num - start), seed=seed + i, device=device, **how)
        images.append(x.cpu())
        labels.append(None if y is None else y.cpu())
    return torch.cat(images), (None if labels[0] is None else torch.cat(labels))


def sample_task(cfg: DictConfig) -> list[Path]:
    device = pick_device(cfg.device)
    sampler = sampler_from_checkpoint(cfg.ckpt, cfg.ema, device)
    plan = schedules(cfg, sampler)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, how in plan.items():
        images, labels = sample_batched(sampler, cfg.num, cfg.batch_size, cfg.seed, device, **how)
        png, npz = out / f"samples_{name}.png", out / f"samples_{name}.npz"
        save_image(image_grid(images[:256]), png)
        arrays = {"arr_0": to_uint8(images)} | ({} if labels is None else {"arr_1": labels.numpy()})
        np.savez(npz, **arrays)
        log.info("wrote %s and %s", png, npz)
        written += [png, npz]
    return written


TASKS = {"sample": sample_task}


def evaluate(cfg: DictConfig) -> list[Path]:
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r} is unknown; choose one of {sorted(TASKS)}")
    return TASKS[cfg.task](cfg)
