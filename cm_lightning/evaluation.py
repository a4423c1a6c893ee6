"""``python evaluate.py ckpt=PATH``: samples from a trained checkpoint."""

import json
import logging
from pathlib import Path

import numpy as np
import torch
from lightning.fabric import Fabric
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

from cm_lightning import wandb_runs
from cm_lightning.runtime import ddp
from cm_lightning.callbacks.metrics import log_results
from cm_lightning.callbacks.sample_grid import image_grid
from cm_lightning.loading import export_state_dict, sampler_from_checkpoint
from cm_lightning.loading import META_KEY, is_plain, read_checkpoint
from cm_lightning.diffusion.editing import check_levels
from cm_lightning.diffusion.sampling import sigmas_from_indices
from cm_lightning.editing_tasks import EDIT_TASKS
from cm_lightning.errors import ConfigError
from cm_lightning.inputs import check_evaluation
from cm_lightning.metrics.fidelity import Fidelity
from cm_lightning.metrics.midpoint_search import ternary_search
from cm_lightning.metrics.reference import ReferenceSource
from cm_lightning.metrics.sharding import progress, share, sharded_features
from cm_lightning.runtime.run_dir import check_output_dir, refuse_existing, write_hydra_files
from cm_lightning.sampler import Sampler
from cm_lightning.runtime.speed import Speed, auto_precision
from cm_lightning.tasks.report import report_task
from cm_lightning.untrusted import instantiate_trusted

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images (N, C, H, W) to the authors' uint8 (N, H, W, C) layout."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def levels(sampler: Sampler, sigmas) -> dict:
    """A plan from EDM noise levels, as the sampler's parameterisation's own levels (TrigFlow: arctan(sigma / sigma_d))."""
    return dict(sigmas=[sampler.param.from_sigma(s) for s in sigmas])


def schedules(cfg: DictConfig, sampler: Sampler) -> dict:
    """Named sampling plans: explicit sigmas, the authors' ts indices, or step counts."""
    few_step = sampler.param.few_step
    if not few_step and (cfg.sigmas is not None or cfg.ts is not None):
        raise ConfigError(f"sigmas= and ts= set the levels of consistency sampling, but ckpt={cfg.ckpt} is a diffusion "
                          "denoiser; drop them and use steps= and solver=")
    if few_step and cfg.solver != "heun":
        raise ConfigError(f"solver={cfg.solver} applies to diffusion teachers, but ckpt={cfg.ckpt} is a consistency "
                          "model sampled by CM Algorithm 1; drop solver=")
    if cfg.sigmas is not None:
        grid = sampler.param.grid
        return {"sigmas": levels(sampler, check_levels(cfg.sigmas, grid["sigma_min"], grid["sigma_max"], "sigmas"))}
    if cfg.ts is not None:
        sigmas = sigmas_from_indices(cfg.ts, cfg.ts_num_scales, **sampler.param.grid)
        return {"ts" + "-".join(str(t) for t in cfg.ts): levels(sampler, sigmas)}
    if not few_step:
        steps = [18] if list(cfg.steps) == [1, 2] else list(cfg.steps)
        return {f"{k}step": dict(steps=int(k), solver=cfg.solver) for k in steps}
    return sampler.default_plans(cfg.steps)


def class_labels(classes, num: int, sampler: Sampler) -> torch.Tensor | None:
    """``classes=[...]`` repeated over the ``num`` samples; None leaves them random (class-conditional models)."""
    if classes is None:
        return None
    classes = [int(c) for c in classes]
    if not sampler.num_classes or not classes or not all(0 <= c < sampler.num_classes for c in classes):
        raise ConfigError(f"classes={classes} must be class indices in 0..{sampler.num_classes - 1} of a "
                          "class-conditional model; drop classes= for an unconditional one")
    return torch.tensor(classes).repeat(-(-num // len(classes)))[:num]


def speed_up(sampler: Sampler, cfg: DictConfig, device) -> Sampler:
    """evaluate.yaml's ``speed``: precision, channels-last, and compilation (with ``auto``: on a GPU, for the
    tasks that sample thousands of images, which repay the minute it takes)."""
    s = cfg.speed
    compile_ = s.compile
    if compile_ == "auto" and cfg.task not in ("fid", "search_midpoint"):
        compile_ = False
    precision = auto_precision(device) if s.precision == "auto" else s.precision
    speed = Speed(channels_last=s.channels_last, compile=compile_, sample_compile_mode=s.sample_compile_mode)
    return sampler.speed_up(speed, precision, device)


def sample_batched(sampler: Sampler, num: int, batch_size: int, seed: int, device, labels=None, **how):
    images, out_labels = [], []
    with progress(num, batch_size, 0, 1, "sampling") as bar:
        for i, start in enumerate(range(0, num, batch_size)):
            given = None if labels is None else labels[start : start + batch_size]
            x, y = sampler(min(batch_size, num - start), seed=seed + i, device=device, labels=given, **how)
            images.append(x.cpu())
            out_labels.append(None if y is None else y.cpu())
            bar.update(len(x))
    return torch.cat(images), (None if out_labels[0] is None else torch.cat(out_labels))


def sample_task(cfg: DictConfig) -> list[Path]:
    device = pick_device(cfg.device)
    sampler = sampler_from_checkpoint(cfg.ckpt, cfg.ema, device, net=cfg.get("net"), kind=cfg.get("kind"),
                                      noise_kind=cfg.get("noise_kind", "adm"))
    speed_up(sampler, cfg, device)
    given = class_labels(cfg.get("classes"), cfg.num, sampler)
    plan = schedules(cfg, sampler)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, how in plan.items():
        images, labels = sample_batched(sampler, cfg.num, cfg.batch_size, cfg.seed, device, given, **how)
        png, npz = out / f"samples_{name}.png", out / f"samples_{name}.npz"
        save_image(image_grid(images[:256]), png)
        arrays = {"arr_0": to_uint8(images)} | ({} if labels is None else {"arr_1": labels.numpy()})
        np.savez(npz, **arrays)
        log.info("wrote %s and %s", png, npz)
        written += [png, npz]
    return written


def export_task(cfg: DictConfig) -> list[Path]:
    """``task=export``: the run's EMA network as a plain state dict, the format of the authors' files."""
    out = cfg.get("export_to") or Path(cfg.out_dir) / "model_ema.pt"
    refuse_existing(out, "export_to", cfg.get("overwrite", False), "choose another export_to=...")
    out = export_state_dict(cfg.ckpt, out, cfg.ema)
    log.info("wrote %s", out)
    return [out]


def launch(cfg: DictConfig) -> Fabric:
    """``trainer.devices`` processes, one per device (Lightning Fabric: the others re-run this command)."""
    accelerator = "auto" if cfg.device == "auto" else torch.device(cfg.device).type
    ddp.exit_with_launcher()
    fabric = Fabric(accelerator=accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
                    strategy=cfg.trainer.strategy)
    fabric.launch()
    return fabric


def training_data(cfg: DictConfig):
    """The data module a cm-lightning checkpoint was trained on, from the config it carries."""
    ckpt = read_checkpoint(cfg.ckpt, "ckpt")
    if is_plain(ckpt):
        raise ConfigError(f"ckpt={cfg.ckpt} is a plain state dict without its training config; pass "
                          "metrics.reference=<.npz of real images in the authors' format>")
    return instantiate_trusted(ckpt[META_KEY]["config"]["data"], "the checkpoint's data")


class Scorer:
    """What task=fid and task=search_midpoint share. Building it checks everything a user can get wrong
    (the weights, the sample and reference counts, the image size); ``start`` launches the processes and
    reads the reference statistics; ``score`` then runs on every rank, with the metrics on rank 0."""

    def __init__(self, cfg: DictConfig):
        m = cfg.metrics
        self.cfg, self.cache_dir = cfg, m.cache_dir
        self.fidelity = Fidelity(m.feature_extractor, m.feature_extractor_weights_path, m.fid, m.isc, m.kid, m.prc,
                                 m.kid_subset_size)
        self.fidelity.check_count(cfg.num, "num")
        self.sampler = sampler_from_checkpoint(cfg.ckpt, cfg.ema, "cpu", net=cfg.get("net"), kind=cfg.get("kind"),
                                               noise_kind=cfg.get("noise_kind", "adm"))
        data = training_data(cfg) if m.reference is None else None
        self.source = ReferenceSource.create(m.reference, data, m.reference_num)
        self.source.check(self.sampler.image_shape, self.fidelity, f"ckpt={cfg.ckpt}")
        self.fabric = self.reference = None

    def start(self) -> "Scorer":
        self.fabric = launch(self.cfg)
        self.sampler.net.to(self.fabric.device)
        speed_up(self.sampler, self.cfg, self.fabric.device)
        if self.fabric.is_global_zero:
            self.reference = self.source.load(self.fidelity, self.cache_dir, self.fabric.device)
        return self

    def score(self, how: dict) -> dict | None:
        cfg = self.cfg
        features = sharded_features(self.sampler, self.fidelity, cfg.num, cfg.batch_size, cfg.seed,
                                    self.fabric.device, **how)
        if features is None:
            return None
        return {"nfe": self.sampler.nfe(how), **self.fidelity.compute(features, self.reference)}

    def report(self, name: str, payload: dict) -> Path:
        """``<out_dir>/<name>.json``: the payload and the settings it was measured under."""
        cfg = self.cfg
        path = Path(cfg.out_dir) / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = dict(task=cfg.task, ckpt=str(cfg.ckpt), num=cfg.num, seed=cfg.seed,
                      metrics=OmegaConf.to_container(cfg.metrics), reference=self.source.name)
        path.write_text(json.dumps(header | payload, indent=2))
        log.info("wrote %s: %s", path, json.dumps(payload))
        return path

    def wandb(self) -> WandbLogger | None:
        return wandb_runs.evaluation_logger(self.cfg)


def fid_task(cfg: DictConfig) -> list[Path]:
    """``task=fid``: the metrics of each step count (or ``sigmas=``/``ts=``; teachers: Heun) as metrics.json."""
    scorer = Scorer(cfg)
    plan = schedules(cfg, scorer.sampler)
    scorer.start()
    results = {name: scorer.score(how) for name, how in plan.items()}
    if not scorer.fabric.is_global_zero:
        return []
    logger = scorer.wandb()
    if logger is not None:
        log_results([logger], results, read_checkpoint(cfg.ckpt, "ckpt").get("global_step", 0), [])
    return [scorer.report("metrics", {"results": results})]


def search_midpoint_task(cfg: DictConfig) -> list[Path]:
    """``task=search_midpoint``: the two-step schedule ts=(0, p, ts_num_scales - 1) with the lowest FID,
    by the authors' ternary search over p (``metrics/midpoint_search.py``), ``num`` samples per candidate."""
    last = cfg.ts_num_scales - 1
    if last < 2:
        raise ConfigError(f"ts_num_scales={cfg.ts_num_scales} leaves no midpoint; the authors search a grid of 40")
    max_evals = None if cfg.search_budget is None else cfg.search_budget // cfg.num
    if max_evals is not None and max_evals < 1:
        raise ConfigError(f"search_budget={cfg.search_budget} is less than num={cfg.num}, the samples of one "
                          "candidate; raise search_budget or lower num")
    if not cfg.metrics.fid:
        raise ConfigError("task=search_midpoint ranks candidates by FID; set metrics.fid=true")
    scorer = Scorer(cfg)
    if not scorer.sampler.param.few_step:
        raise ConfigError(f"ckpt={cfg.ckpt} is an EDM model; the midpoint search is for consistency models")
    scorer.start()
    candidates = {}

    def fid(p: int) -> float:
        sigmas = sigmas_from_indices([0, p, last], cfg.ts_num_scales, **scorer.sampler.param.grid)
        result = scorer.score(levels(scorer.sampler, sigmas))
        if result is not None:
            candidates[p] = {"ts": [0, p, last], "sigmas": sigmas, **result}
        return share(None if result is None else result["fid"])

    best, _ = ternary_search(fid, 1, last - 1, max_evals)
    if not scorer.fabric.is_global_zero:
        return []
    rows = [candidates[p] for p in sorted(candidates)]
    logger = scorer.wandb()
    if logger is not None:
        columns = [k for k in rows[0] if k not in ("ts", "sigmas")]
        logger.log_table("search/fid_vs_midpoint", ["midpoint", "sigma", *columns],
                         [[r["ts"][1], r["sigmas"][1], *(r[c] for c in columns)] for r in rows])
        logger.log_metrics({"search/best_midpoint": best, "search/best_fid": candidates[best]["fid"]})
    payload = {"best": candidates[best], "samples_used": cfg.num * len(rows), "candidates": rows}
    return [scorer.report("search_midpoint", payload)]


TASKS = {"sample": sample_task, "export": export_task, "fid": fid_task, "search_midpoint": search_midpoint_task,
         "report": report_task}
TASKS.update(EDIT_TASKS)


def evaluate(cfg: DictConfig) -> list[Path]:
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r} is unknown; choose one of {sorted(TASKS)}")
    check_evaluation(cfg)
    overwrite = bool(cfg.get("overwrite", False))
    check_output_dir(cfg.out_dir, overwrite)
    written = TASKS[cfg.task](cfg)
    write_hydra_files(cfg, cfg.out_dir, overwrite)  # after the task's own checks: a refused command writes nothing
    wandb_runs.record_evaluation(cfg, written)
    return written
