"""What evaluate.py's tasks share: the checkpoint read once, the device, Fabric's processes, the sampling plans,
batched sampling, the authors' .npz layout, and the scoring of task=fid and task=search_midpoint."""

import functools
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
from cm_lightning.inputs import check_cpu_devices, check_device, whole
from cm_lightning.loading import is_plain, read_checkpoint, sampler_from
from cm_lightning.metrics.fidelity import Fidelity, to_uint8
from cm_lightning.metrics.reference import ReferenceSource
from cm_lightning.metrics.sharding import progress, seeded_chunks, sharded_features
from cm_lightning.runtime import atomic, ddp
from cm_lightning.runtime.speed import Speed, auto_precision
from cm_lightning.sampler import Sampler
from cm_lightning.untrusted import instantiate_trusted

log = logging.getLogger(__name__)


# The most samples one command draws: FID's 50,000 twice over. Samples are held in memory until written, so a
# typo such as num=10^12 stops here instead of filling memory.
NUM_MAX = 100_000


def check_numbers(cfg: DictConfig) -> None:
    """The numbers and devices of the task's options (those it has), before anything is read."""
    for key, example in (("num", "64"), ("batch_size", "256")):
        if key in cfg:
            whole(cfg[key], key, example=example)
    if "num" in cfg and cfg.num > NUM_MAX:
        raise ConfigError(f"num={cfg.num} is above the most one command draws ({NUM_MAX:,}); use num={NUM_MAX} or less")
    sigmas = cfg.get("sigmas")
    numbers = OmegaConf.is_list(sigmas) and all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in sigmas)
    if sigmas is not None and not numbers:
        raise ConfigError(f"sigmas={sigmas} must be a list of noise levels, e.g. sigmas=[80.0,0.8]")
    if cfg.get("solver") not in (None, "heun", "euler"):
        raise ConfigError(f"solver={cfg.solver} is unknown; use solver=heun or solver=euler (EDM teachers)")
    steps = cfg.get("steps")
    if steps is not None and (not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps)):
        raise ConfigError(
            f"steps={list(steps)}: each entry is a number of sampling steps >= 1 (a 0-step "
            "sample does not exist), e.g. steps=[1,2]; or steps=null for the model's default"
        )
    if "device" in cfg:
        check_device(cfg.device)
    if "trainer" in cfg:
        check_cpu_devices(cfg.trainer.devices, "cpu" if str(cfg.device) == "cpu" else "auto")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def checkpoint(path) -> dict:
    """``ckpt=`` as read, once per command: the task, its scorer and its W&B record share it. Keyed by the
    file's modification time and size too, so that a file rewritten in the same process is read again."""
    file = Path(str(path))
    stamp = (file.stat().st_mtime_ns, file.stat().st_size) if file.is_file() else None
    return _read(str(path), stamp)


@functools.lru_cache(maxsize=1)
def _read(path: str, stamp) -> dict:
    return read_checkpoint(path, "ckpt")


def load_sampler(cfg: DictConfig, device) -> Sampler:
    """The sampler of ``ckpt=``; ``net=`` and ``kind=`` say what a plain state dict is."""
    return sampler_from(checkpoint(cfg.ckpt), cfg.ckpt, cfg.ema, device, cfg.get("net"), cfg.get("kind"))


def speed_up(sampler: Sampler, cfg: DictConfig, device) -> Sampler:
    """The task's ``speed``: precision, channels-last and compilation."""
    s = cfg.speed
    precision = auto_precision(device) if s.precision == "auto" else s.precision
    speed = Speed(channels_last=s.channels_last, compile=s.compile, sample_compile_mode=s.sample_compile_mode)
    return sampler.speed_up(speed, precision, device)


def sampling_plans(cfg: DictConfig, sampler: Sampler) -> dict:
    """The plans of ``sigmas=``, the authors' ``ts=`` indices, or ``steps=`` (null: the model's default)."""
    return sampler.requested(cfg.sigmas, cfg.ts, cfg.ts_num_scales, cfg.steps, cfg.solver, f"ckpt={cfg.ckpt}")


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
        self.ckpt = checkpoint(cfg.ckpt)
        self.sampler = load_sampler(cfg, "cpu")
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
