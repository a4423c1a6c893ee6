"""FID, IS, KID and precision/recall of the EMA weights' samples during training, sharded over ranks.

Every ``every_n_steps`` optimiser steps and, with ``at_end``, after the last one (unless the run was
shorter than one interval) the callback draws ``num`` samples at each of ``steps`` (the EDM teacher:
``teacher_steps`` Heun steps), split over the DDP ranks (``metrics/sharding.py``), and rank 0 scores
them against the cached reference statistics of the training set (``metrics/reference.py``), scored as
conf/metrics/default.yaml says. Keys carry the sampling plan (``metrics/fid_1step``); W&B also gets a
table of every score against the number of function evaluations (NFE), and the run directory a
``metrics.json`` of every measurement (``evaluate.py task=report``).
"""

import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from cm_lightning.diffusion.sampling import TEACHER_STEPS
from cm_lightning.errors import ConfigError
from cm_lightning.metrics.fidelity import NAMES, Fidelity
from cm_lightning.metrics.reference import ReferenceSource
from cm_lightning.metrics.sharding import sharded_features
from cm_lightning.runtime import atomic
from cm_lightning.wandb_runs import define_summaries, wandb_identity

log = logging.getLogger(__name__)
TABLE_KEY = "metrics/fid_vs_nfe"


def log_results(loggers, results: dict[str, dict], step: int, rows: list) -> None:
    """``results``: {sampling name: {"nfe": ..., "fid": ..., ...}}; ``rows`` accumulates the W&B table."""
    metrics = [m for m in dict.fromkeys(NAMES.values()) if any(m in r for r in results.values())]
    rows += [[step, name, r["nfe"], *(r.get(m) for m in metrics)] for name, r in results.items()]
    flat = {f"metrics/{m}_{name}": r[m] for name, r in results.items() for m in metrics if m in r}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            define_summaries(logger.experiment, flat)  # before the first values, which W&B summarises as defined
        logger.log_metrics(flat, step=step)
        if isinstance(logger, WandbLogger):
            logger.log_table(key=TABLE_KEY, columns=["step", "sampling", "nfe", *metrics], data=rows, step=step)
        logger.save()


def earlier_history(path: Path) -> list[dict]:
    """The measurements a resumed run made before, from its ``metrics.json``. A file that does not parse as
    one (cut short by a kill or a full disk before writes were atomic, or edited by hand) is set aside as
    ``metrics.json.damaged`` with a warning, and the history starts again, instead of stopping every resume."""
    if not path.is_file():
        return []
    try:
        history = json.loads(path.read_text())["history"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        history = None
    if isinstance(history, list) and all(isinstance(h, dict) and isinstance(h.get("step"), int) for h in history):
        return history
    aside = path.with_name("metrics.json.damaged")
    path.replace(aside)
    log.warning("%s is damaged (not a metrics history); moved it to %s and started the history afresh", path, aside)
    return []


class Metrics(L.Callback):
    def __init__(
        self,
        every_n_steps: int | None = 1000,
        at_end: bool = True,
        num: int = 500,
        steps=(1, 2),
        teacher_steps: int | None = None,
        batch_size: int = 250,
        seed: int = 0,
        feature_extractor: str = "digits-classifier",
        feature_extractor_weights_path=None,
        fid: bool = True,
        isc: bool = True,
        kid: bool = False,
        prc: bool = False,
        kid_subset_size: int = 1000,
        reference=None,
        reference_num: int | None = 50000,
        cache_dir=None,
    ):
        if every_n_steps is not None and every_n_steps < 1:
            raise ConfigError(
                f"callbacks.metrics.every_n_steps={every_n_steps}; use a positive step count, "
                "or null to measure only at the end with at_end=true"
            )
        # The arguments are the metrics config's keys (conf/callbacks/default.yaml takes them from conf/metrics/).
        self.fidelity = Fidelity.from_config(locals())
        self.fidelity.check_count(num, "callbacks.metrics.num")
        self.every_n_steps, self.at_end, self.num, self.seed = every_n_steps, at_end, num, seed
        self.steps, self.batch_size = [int(k) for k in steps], batch_size
        self.teacher_steps = teacher_steps or TEACHER_STEPS
        self.reference_path, self.reference_num, self.cache_dir = reference, reference_num, cache_dir
        self.source = self.reference = None
        self.measured_step = None
        self.rows: list = []

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        if self.reference_path is None and trainer.datamodule is None:
            raise ConfigError(
                "callbacks.metrics.reference is null but there is no data module to take the "
                "training set from; pass reference=<npz in the authors' format>"
            )
        # A latent run (latent/data.py) is scored on decoded samples against its source's pixels.
        data = getattr(trainer.datamodule, "source", trainer.datamodule)
        self.source = ReferenceSource.create(self.reference_path, data, self.reference_num)
        self.source.check(pl_module.sampler().pixel_shape, self.fidelity, "the model")

    @torch.no_grad()
    def measure(self, trainer, module) -> dict[str, dict]:
        start, self.measured_step = time.time(), trainer.global_step
        if trainer.is_global_zero and self.reference is None:
            # Read (or computed and cached) on first use: runs that never measure leave the cache alone.
            self.reference = self.source.load(self.fidelity, self.cache_dir, module.device)
        sampler, results = module.sampler(), {}
        for name, how in sampler.plans(self.steps, teacher_steps=[self.teacher_steps]).items():
            features = sharded_features(
                sampler, self.fidelity, self.num, self.batch_size, self.seed, module.device, **how
            )
            if trainer.is_global_zero:
                results[name] = {"nfe": sampler.nfe(how), **self.fidelity.compute(features, self.reference)}
        if trainer.is_global_zero:
            log_results(trainer.loggers, results, trainer.global_step, self.rows)
            self.write_json(trainer, results)
            log.info("metrics at step %d (%.1f s): %s", trainer.global_step, time.time() - start, results)
        return results

    def write_json(self, trainer, results: dict[str, dict]) -> None:
        """``<run dir>/metrics.json``: every measurement so far and what makes them comparable across runs
        (reference, feature extractor, sample count), which ``evaluate.py task=report`` reads offline."""
        path = Path(trainer.default_root_dir) / "metrics.json"
        history = earlier_history(path)
        step = trainer.global_step
        history = [h for h in history if h["step"] < step] + [{"step": step, "results": results}]  # resumed runs
        payload = dict(
            reference=self.source.name,
            feature_extractor=self.fidelity.extractor_name,
            num=self.num,
            wandb=wandb_identity(trainer.loggers),
            history=history,
        )
        atomic.write_text(path, json.dumps(payload, indent=2))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self.measured_step:
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        step = trainer.global_step
        # Runs shorter than one interval (smoke tests, quick checks) are not measured.
        long_enough = self.every_n_steps is None or step >= self.every_n_steps
        if self.at_end and long_enough and step != self.measured_step:
            self.measure(trainer, pl_module)
