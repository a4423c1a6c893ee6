"""What evaluate.py's tasks share: the sampler of ``ckpt=``, the device, Fabric's processes, the plan options,
batched sampling, the authors' .npz layout, and the scoring of task=fid and task=search_midpoint."""

import json
import logging
from pathlib import Path

import numpy as np
import torch
from lightning.fabric import Fabric
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from cm_lightning import wandb_runs
from cm_lightning.checkpoint import META_KEY
from cm_lightning.errors import ConfigError
from cm_lightning.loading import is_plain, read_once, sampler_from_checkpoint
from cm_lightning.metrics.fidelity import Fidelity, to_uint8
from cm_lightning.metrics.reference import ReferenceSource
from cm_lightning.metrics.sharding import progress, seeded_chunks, sharded_features
from cm_lightning.runtime import atomic, ddp
from cm_lightning.runtime.speed import Speed, auto_precision
from cm_lightning.sampler import Sampler
from cm_lightning.untrusted import instantiate_trusted

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_sampler(cfg: DictConfig, device, speed: bool = True) -> Sampler:
    """The sampler of ``ckpt=`` on ``device``, sped up as the task's ``speed`` says unless ``speed=False`` (the
    scorer speeds it up on each process's device); ``net=`` and ``kind=`` say what a plain state dict is."""
    sampler = sampler_from_checkpoint(cfg.ckpt, cfg.ema, device, cfg.get("net"), cfg.get("kind"))
    return speed_up(sampler, cfg, device) if speed else sampler


def speed_up(sampler: Sampler, cfg: DictConfig, device) -> Sampler:
    """The task's ``speed``: precision, channels-last and compilation."""
    s = cfg.speed
    precision = auto_precision(device) if s.precision == "auto" else s.precision
    speed = Speed(channels_last=s.channels_last, compile=s.compile, sample_compile_mode=s.sample_compile_mode)
    return sampler.speed_up(speed, precision, device)


def plan_options(cfg: DictConfig) -> dict:
    """``Sampler.requested``'s arguments from the task's ``sigmas=``, ``ts=`` (the authors' indices), ``steps=``
    (null: the model's default) and ``solver=``."""
    return dict(
        sigmas=cfg.sigmas,
        ts=cfg.ts,
        ts_num_scales=cfg.ts_num_scales,
        steps=cfg.steps,
        solver=cfg.solver,
        model=f"ckpt={cfg.ckpt}",
    )


def sample_batched(sampler: Sampler, num: int, batch_size: int, seed: int, device, labels=None, **how):
    """``num`` samples and their labels on the CPU, in ``seeded_chunks``."""
    images, out_labels = [], []
    with progress(num, batch_size, 0, 1, "sampling") as bar:
        for start, size, chunk_seed in seeded_chunks(num, batch_size, seed):
            given = None if labels is None else labels[start : start + size]
            x, y = sampler(size, seed=chunk_seed, device=device, labels=given, **how)
            images.append(x.cpu())
            out_labels.append(None if y is None else y.cpu())
            bar.update(len(x))
    return torch.cat(images), (None if out_labels[0] is None else torch.cat(out_labels))


def authors_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images (N, C, H, W) in the authors' .npz layout: uint8 (N, H, W, C)."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def write_npz(path: Path, images: torch.Tensor, labels: torch.Tensor | None) -> Path:
    """The authors' sample format: ``arr_0`` the images, ``arr_1`` the class labels of a conditional model."""
    arrays = {"arr_0": authors_uint8(images)} | ({} if labels is None else {"arr_1": labels.numpy()})
    with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def launch(cfg: DictConfig) -> Fabric:
    """``trainer.devices`` processes, one per device (Lightning Fabric: the others re-run this command)."""
    accelerator = "auto" if cfg.device == "auto" else torch.device(cfg.device).type
    ddp.exit_with_launcher()
    fabric = Fabric(
        accelerator=accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
    )
    fabric.launch()
    return fabric


class Scorer:
    """What task=fid and task=search_midpoint share. Building it checks everything a user can get wrong
    (the weights, the sample and reference counts, the image size); ``start`` launches the processes and
    reads the reference statistics; ``score`` then runs on every rank, with the metrics on rank 0."""

    def __init__(self, cfg: DictConfig):
        m = cfg.metrics
        self.cfg, self.cache_dir = cfg, m.cache_dir
        self.fidelity = Fidelity.from_config(m)
        self.fidelity.check_count(cfg.num, "num")
        self.ckpt = read_once(cfg.ckpt)
        self.sampler = load_sampler(cfg, "cpu", speed=False)
        self.source = ReferenceSource.create(
            m.reference, self.training_data() if m.reference is None else None, m.reference_num
        )
        self.source.check(self.sampler.pixel_shape, self.fidelity, f"ckpt={cfg.ckpt}")
        self.fabric = self.reference = None

    def training_data(self):
        """The data module the checkpoint was trained on, from the config it carries."""
        if is_plain(self.ckpt):
            raise ConfigError(
                f"ckpt={self.cfg.ckpt} is a plain state dict without its training config; pass "
                "metrics.reference=<.npz of real images in the authors' format>"
            )
        data = self.ckpt[META_KEY]["config"].get("data")
        if not isinstance(data, dict):
            raise ConfigError(
                f"ckpt={self.cfg.ckpt} carries no data config to take real images from; pass "
                "metrics.reference=<.npz of real images in the authors' format>"
            )
        # A latent run's real images are its source's pixels, not the cached latents (latent/data.py).
        return instantiate_trusted(data.get("source") or data, "the checkpoint's data")

    def start(self) -> "Scorer":
        self.fabric = launch(self.cfg)
        self.sampler.net.to(self.fabric.device)
        speed_up(self.sampler, self.cfg, self.fabric.device)
        if self.fabric.is_global_zero:
            self.reference = self.source.load(self.fidelity, self.cache_dir, self.fabric.device)
        return self

    def score(self, how: dict) -> dict | None:
        cfg = self.cfg
        features = sharded_features(
            self.sampler, self.fidelity, cfg.num, cfg.batch_size, cfg.seed, self.fabric.device, **how
        )
        if features is None:
            return None
        return {"nfe": self.sampler.nfe(how), **self.fidelity.compute(features, self.reference)}

    def report(self, name: str, payload: dict) -> Path:
        """``<out_dir>/<name>.json``: the payload and the settings it was measured under."""
        cfg = self.cfg
        path = Path(cfg.out_dir) / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = dict(
            task=cfg.task,
            ckpt=str(cfg.ckpt),
            num=cfg.num,
            seed=cfg.seed,
            metrics=OmegaConf.to_container(cfg.metrics),
            reference=self.source.name,
        )
        atomic.write_text(path, json.dumps(header | payload, indent=2))
        log.info("wrote %s: %s", path, json.dumps(payload))
        return path

    def wandb(self) -> WandbLogger | None:
        return wandb_runs.evaluation_logger(self.cfg, self.ckpt)
