"""``python train.py``: build everything from the Hydra config, check it, and fit, resuming the run
directory's newest checkpoint when there is one (``ckpt_path: auto``)."""

import secrets
import warnings
from pathlib import Path

import lightning as L
from hydra.utils import get_class, instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from cm_lightning import wandb_runs
from cm_lightning.callbacks.checkpoint import AtomicCheckpointIO, check_writable, checkpoint_dir, resume_path
from cm_lightning.callbacks.telemetry import usable
from cm_lightning.errors import ConfigError
from cm_lightning.inputs import check_training
from cm_lightning.runtime import atomic, ddp, slurm
from cm_lightning.runtime.run_dir import OptimizerSettings, check_fresh_start, check_resume, write_hydra_files
from cm_lightning.untrusted import fit_options


def check_data_matches_net(data, net) -> None:
    """The network must take the dataset's images and labels; say which value to change otherwise."""
    for attr, data_attr in (("image_size", "image_size"), ("in_channels", "channels")):
        if getattr(net, attr) != getattr(data, data_attr):
            raise ConfigError(
                f"net.{attr}={getattr(net, attr)} but data.{data_attr}={getattr(data, data_attr)}; "
                f"set net.{attr}={getattr(data, data_attr)} (or leave it to its default interpolation)"
            )
    net_classes = getattr(net, "num_classes", 0)
    if net_classes and net_classes != data.num_classes:
        raise ConfigError(
            f"net.num_classes={net_classes} but the data has {data.num_classes} classes; "
            f"set net.num_classes={data.num_classes}, or 0 for an unconditional model"
        )


def needs_teacher(model: DictConfig) -> bool:
    """Whether a model config reads ``model.teacher_ckpt``: to start from the teacher's weights, or because its
    objective distils the teacher (CD's pair rule, sCD)."""
    objective = model.get("objective") or {}
    pair = (objective.get("pair") or {}).get("_target_")
    return bool(
        model.get("init_from_teacher")
        or objective.get("distill")
        or (pair is not None and get_class(pair).requires_teacher)
    )


def wandb_run_id(run_dir) -> str:
    """This run directory's W&B run id, made once and kept in ``<run dir>/wandb_run_id``, so that a resumed
    run (requeued, or started again by hand) goes on logging to the same W&B run."""
    path = Path(str(run_dir)) / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(8)
    if rank_zero_only.rank == 0:  # the only rank that logs; the others never use the id
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, run_id + "\n")
    return run_id


def build_logger(c: DictConfig):
    target = c.get("_target_")
    if target and issubclass(get_class(target), WandbLogger) and not c.get("id"):
        return instantiate(c, id=wandb_run_id(c.get("save_dir") or "."), resume="allow")
    return instantiate(c)


def build(cfg: DictConfig):
    """Data, model, callbacks, loggers and trainer, each with ``hydra.utils.instantiate``; the checks that
    need them run here, before any process is started or any step is taken."""
    # Inside a SLURM job the allocation binds first: its message names what SLURM started.
    slurm.check_allocation(
        cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1), cfg.trainer.get("accelerator", "auto")
    )
    check_training(cfg)
    data = instantiate(cfg.data, seed=cfg.seed)
    model = instantiate(cfg.model)
    check_data_matches_net(data, model.net)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [build_logger(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    callbacks = usable(callbacks, loggers, cfg.trainer.get("enable_progress_bar", True))
    # One preemption mechanism (callbacks/preemption.py): Lightning's SLURM auto-requeue is switched off.
    plugins = [AtomicCheckpointIO()] + ([SLURMEnvironment(auto_requeue=False)] if slurm.managed() else [])
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    data.per_device_batch(trainer.world_size, trainer.accumulate_grad_batches)
    check_writable(checkpoint_dir(trainer))
    return data, model, trainer


def prepare_run_dir(cfg: DictConfig, model, trainer, ckpt) -> None:
    """The run directory's rules (``runtime/run_dir.py``): a fresh start writes over no other run's checkpoints or
    config without ``overwrite=true``; a resume keeps the method and applies the optimiser settings."""
    overwrite = bool(cfg.get("overwrite", False))
    if ckpt is not None:
        check_resume(ckpt, model.run_config)
        trainer.callbacks.append(OptimizerSettings(model.optimizer_factory))
    write_hydra_files(cfg, trainer.default_root_dir, overwrite, resuming=ckpt is not None)


def train(cfg: DictConfig) -> Path:
    L.seed_everything(cfg.seed, workers=True)
    ddp.use_rank_command()
    with ddp.job_scope(), warnings.catch_warnings():
        ddp.exit_with_launcher()
        # The target network, the teacher and the EMAs are frozen in eval mode by design; Lightning's warning
        # about modules in eval mode at the start of training would greet every run and say nothing.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        # Resolved and the directory cleared before anything is built: the loggers read the run's W&B id.
        run_dir = Path(cfg.trainer.default_root_dir)
        checkpoints = OmegaConf.select(cfg, "callbacks.checkpoint.dirpath") or run_dir / "checkpoints"
        ckpt = resume_path(cfg.get("ckpt_path"), checkpoints)
        inputs = {"model.teacher_ckpt": OmegaConf.select(cfg, "model.teacher_ckpt"), "ckpt_path": ckpt}
        check_fresh_start(ckpt, checkpoints, run_dir, bool(cfg.get("overwrite", False)), inputs)
        data, model, trainer = build(cfg)
        prepare_run_dir(cfg, model, trainer, ckpt)
        trainer.fit(model, datamodule=data, ckpt_path=ckpt, **fit_options(trainer))
        wandb_runs.finish(trainer.loggers)
    return Path(trainer.default_root_dir)
