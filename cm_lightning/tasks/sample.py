"""``task=sample``: PNG grids and .npz files of each sampling plan; ``task=fid``: the metrics of each plan."""

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchvision.utils import save_image

from cm_lightning.callbacks.metrics import log_results
from cm_lightning.callbacks.sample_grid import image_grid
from cm_lightning.errors import ConfigError
from cm_lightning.runtime import atomic
from cm_lightning.sampler import Sampler
from cm_lightning.tasks.common import (
    Scorer,
    load_sampler,
    pick_device,
    plan_options,
    sample_batched,
    write_npz,
)

log = logging.getLogger(__name__)


def class_labels(classes, num: int, sampler: Sampler) -> torch.Tensor | None:
    """``classes=[...]`` repeated over the ``num`` samples; None leaves them random (class-conditional models)."""
    if classes is None:
        return None
    classes = [int(c) for c in classes]
    if not sampler.num_classes or not classes or not all(0 <= c < sampler.num_classes for c in classes):
        raise ConfigError(
            f"classes={classes} must be class indices in 0..{sampler.num_classes - 1} of a "
            "class-conditional model; drop classes= for an unconditional one"
        )
    return torch.tensor(classes).repeat(-(-num // len(classes)))[:num]


def sample_task(cfg: DictConfig) -> list[Path]:
    device = pick_device(cfg.device)
    sampler = load_sampler(cfg, device)
    given = class_labels(cfg.classes, cfg.num, sampler)
    plans = sampler.requested(**plan_options(cfg))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, how in plans.items():
        images, labels = sample_batched(sampler, cfg.num, cfg.batch_size, cfg.seed, device, given, **how)
        png = out / f"samples_{name}.png"
        with atomic.replacing(png) as tmp:
            save_image(image_grid(images[:256]), tmp, format="png")
        npz = write_npz(out / f"samples_{name}.npz", images, labels)
        log.info("wrote %s and %s", png, npz)
        written += [png, npz]
    return written


def fid_task(cfg: DictConfig) -> list[Path]:
    """``task=fid``: the metrics of each sampling plan as metrics.json."""
    scorer = Scorer(cfg)
    plans = scorer.sampler.requested(**plan_options(cfg))
    scorer.start()
    results = {name: scorer.score(how) for name, how in plans.items()}
    if not scorer.fabric.is_global_zero:
        return []
    logger = scorer.wandb()
    if logger is not None:
        log_results([logger], results, scorer.ckpt.get("global_step", 0), [])
    return [scorer.report("metrics", {"results": results})]
