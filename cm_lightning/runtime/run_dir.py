"""What a command may do to a directory that already holds work: nothing is written over a checkpoint, an
export, an evaluation's outputs or a run's ``.hydra/`` config without ``overwrite=true``, and a run resumes
only with the settings it was started with.

Hydra itself would write ``.hydra/`` into the output directory before any check could run, so
``conf/hydra/default.yaml`` turns that off (``output_subdir: null``) and ``write_hydra_files`` writes the
same three files once the checks have passed: on a run's first start, never on a resume.
"""

import logging
import shutil
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from cm_lightning.checkpoint import META_KEY, check_layout
from cm_lightning.errors import ConfigError
from cm_lightning.runtime import atomic
from cm_lightning.untrusted import load_file

log = logging.getLogger(__name__)
# Settings that may change on resume: how the optimiser steps (applied by OptimizerSettings), where the
# teacher file lies, and speed. Any other model key changes the network's shape or the method.
RESUMABLE = ("model.optimizer", "model.warmup_steps", "model.lr_decay_ref", "model.teacher_ckpt", "model.speed")
DATA_SHAPE = ("data._target_", "data.image_size", "data.channels")


def refuse_existing(path, key: str, overwrite: bool, elsewhere: str) -> None:
    """Stops with one line when ``path`` exists and ``overwrite`` is not set, naming both ways out; a directory
    is refused even with ``overwrite``, which replaces one file, never a folder's contents."""
    if Path(str(path)).is_dir():
        raise ConfigError(f"{key}={path} is an existing directory; {elsewhere}")
    if Path(str(path)).exists() and not overwrite:
        raise ConfigError(
            f"{key}={path} already exists and would be overwritten; {elsewhere}, or add overwrite=true to replace it"
        )


# What a training run leaves in its directory besides checkpoints and .hydra/ (rewritten by write_hydra_files):
# a fresh start with overwrite=true removes them too, so that two runs never share a history, grids or W&B run.
RUN_OUTPUTS = ("metrics.json", "metrics.json.damaged", "samples", "wandb_run_id")


def inside(path, folder: Path) -> bool:
    path = Path(str(path)).expanduser().resolve()
    return path == folder or folder in path.parents


def check_fresh_start(ckpt, dirpath, run_dir, overwrite: bool, inputs: dict) -> None:
    """A run that does not resume from its own directory's checkpoints would write over them, leaving a mix
    of two runs: refused, or with ``overwrite=true`` the previous run's checkpoints and ``RUN_OUTPUTS`` are
    removed first. Never its inputs: a run directory that holds one of ``inputs`` (``{key: path}``: the
    teacher, the checkpoint resumed from) is refused even with ``overwrite=true``."""
    dirpath, run_dir = Path(str(dirpath)), Path(str(run_dir)).resolve()
    own = ckpt is not None and Path(ckpt).resolve().parent == dirpath.resolve()
    if own or rank_zero_only.rank != 0:
        return
    old = sorted(dirpath.glob("*.ckpt")) if dirpath.is_dir() else []
    outputs = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()] if overwrite else []
    if not old and not outputs:
        return
    held = [f"{key}={path}" for key, path in inputs.items() if path and inside(path, run_dir)]
    if held:
        raise ConfigError(
            f"hydra.run.dir={run_dir} holds this command's input {held[0]}, which starting a run there would "
            "write over or remove; start in another hydra.run.dir=..."
        )
    if not overwrite:
        raise ConfigError(
            f"callbacks.checkpoint.dirpath={dirpath} holds another run's {len(old)} checkpoint(s), "
            "which this start would write over; resume them with ckpt_path=auto, start in another "
            "hydra.run.dir=..., or add overwrite=true to replace them"
        )
    for path in old + outputs:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    log.warning(
        "overwrite=true: removed %d checkpoint(s) and %s of the previous run in %s",
        len(old),
        ", ".join(p.name for p in outputs) or "no other output",
        run_dir,
    )


def check_output_dir(out_dir, overwrite: bool) -> None:
    """evaluate.py writes into ``out_dir``: refused when it already holds results or a training run (any
    file but the log Hydra opened for this command), unless ``overwrite=true``."""
    out = Path(str(out_dir))
    if (out / "checkpoints").is_dir():
        raise ConfigError(
            f"out_dir={out} is a training run's directory; an evaluation never writes into one (its .hydra/ "
            "record and outputs would mix with the run's): write into another hydra.run.dir=... (or out_dir=...)"
        )
    held = sorted(p.name for p in out.iterdir() if p.suffix != ".log") if out.is_dir() else []
    if held and not overwrite and rank_zero_only.rank == 0:
        raise ConfigError(
            f"out_dir={out} already holds {', '.join(held[:4])}{' ...' if len(held) > 4 else ''}; "
            "write into another hydra.run.dir=... (or out_dir=...), or add overwrite=true to replace "
            "its files"
        )


def write_hydra_files(cfg: DictConfig, out_dir, overwrite: bool, resuming: bool = False) -> None:
    """``<out_dir>/.hydra/``: config.yaml, hydra.yaml and overrides.yaml as Hydra writes them. An existing
    one is the record of how the run started: kept on a resume; on a fresh start that records another
    config, the command stops unless ``overwrite=true``."""
    if rank_zero_only.rank != 0 or not HydraConfig.initialized():
        return
    folder = Path(str(out_dir)) / ".hydra"
    if (folder / "config.yaml").is_file():
        same = OmegaConf.load(folder / "config.yaml") == OmegaConf.create(OmegaConf.to_container(cfg))
        if same or resuming:  # the same run started again (a requeue before its first checkpoint), or resumed
            return
        if not overwrite:  # its three files are rewritten below: overwrite=true replaces the record, not a folder
            raise ConfigError(
                f"hydra.run.dir's config={folder} records another run's config and would be overwritten; start in "
                "another hydra.run.dir=..., or add overwrite=true to replace it"
            )
    folder.mkdir(parents=True, exist_ok=True)
    hydra = HydraConfig.instance().cfg
    for name, content in (("config", cfg), ("hydra", hydra), ("overrides", hydra.hydra.overrides.task)):
        atomic.write_text(folder / f"{name}.yaml", OmegaConf.to_yaml(content))


def flat(node, prefix: str = "") -> dict:
    """Dotted keys to leaf values; lists are leaves."""
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(flat(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in out.items()}


def method_keys(config: dict) -> dict:
    keys = flat({"model": config.get("model", {}), "data": config.get("data", {})})
    return {
        k: v
        for k, v in keys.items()
        if (k.startswith("model.") and not k.startswith(RESUMABLE)) or k.startswith(DATA_SHAPE)
    }


def check_resume(ckpt, run_config: dict) -> None:
    """Resuming with another network, method or image shape would fail in a wall of state-dict errors (or,
    worse, train on under another method): one line lists the differing keys instead. The stored config is
    compared as data, never instantiated."""
    loaded = load_file(ckpt, "the checkpoint resumed from", mmap=True)
    if not isinstance(loaded, dict) or META_KEY not in loaded:
        return  # written before checkpoints carried their config: nothing to compare with
    check_layout(loaded, f"ckpt_path={ckpt}")
    stored = loaded[META_KEY]["config"]
    old, new = method_keys(stored), method_keys(run_config)
    # A key only one side has is a setting the project added or dropped since the run started: not compared.
    differ = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
    if differ:
        shown = "; ".join(f"{k}: {old[k]} -> {new[k]}" for k in differ[:6])
        raise ConfigError(
            f"ckpt_path={ckpt} was trained with other settings ({shown}"
            f"{f'; {len(differ) - 6} more' if len(differ) > 6 else ''}); resume with the run's own "
            "settings, or start a new run in another hydra.run.dir=..."
        )


class OptimizerSettings(L.Callback):
    """Applies the configured optimiser settings (``model.optimizer.lr``, ``weight_decay``, ``betas`` ...) to
    the optimiser restored from a checkpoint, whose saved values would otherwise win silently. Under a
    warm-up schedule the restored step's warm-up factor is kept."""

    def __init__(self, factory):
        self.settings = dict(getattr(factory, "keywords", {}))

    def on_train_start(self, trainer, pl_module):
        schedulers = {id(c.scheduler.optimizer): c.scheduler for c in trainer.lr_scheduler_configs}
        for optimizer in trainer.optimizers:
            self.apply(optimizer, schedulers.get(id(optimizer)))

    def apply(self, optimizer, scheduler) -> None:
        for i, group in enumerate(optimizer.param_groups):
            changed = {k: v for k, v in self.settings.items() if k in group and group[k] != as_group(v)}
            for key, value in changed.items():
                rank_zero_only(log.warning)(
                    f"resuming with model.optimizer.{key}={value} (the checkpoint had {group[key]})"
                )
                if key == "lr" and scheduler is not None:
                    factor = group["lr"] / scheduler.base_lrs[i]
                    scheduler.base_lrs[i] = group["initial_lr"] = value
                    value = value * factor
                group[key] = as_group(value)


def as_group(value):
    """A config value as optimisers keep it in their param groups (``betas`` as a tuple)."""
    return tuple(value) if isinstance(value, list) else value
