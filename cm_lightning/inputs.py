"""Types and ranges of the numbers a user sets on the command line, checked before anything is built, so
that ``data.batch_size=abc`` or ``num=0`` stops with one line naming the value instead of a traceback
(or, worse, a run that silently does something else)."""

import math
import os

import torch
from omegaconf import OmegaConf

from cm_lightning.errors import ConfigError


def whole(value, key: str, minimum: int = 1, example: str = "") -> int:
    """``value`` as an integer of at least ``minimum``; one line naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value} must be a whole number >= {minimum}, e.g. {key}={example}")
    return value


def positive(value, key: str, example: str) -> float:
    """``value`` as a finite number above zero; one line naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ConfigError(f"{key}={value} must be a number above 0, e.g. {key}={example}")
    return float(value)


def real(value, key: str, example: str, above: float | None = None, at_least: float | None = None) -> float:
    """``value`` as a finite number (a bool or string is not one), above ``above`` or at least ``at_least``
    when given; one line naming it otherwise."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    if not ok:
        bound = f" above {above}" if above is not None else f" >= {at_least}" if at_least is not None else ""
        raise ConfigError(f"{key}={value} must be a finite number{bound}, e.g. {key}={example}")
    return float(value)


def boolean(value, key: str) -> bool:
    """``value`` as a real boolean: ``distill=maybe`` is a mistake, not true."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value} must be true or false")
    return value


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and SLURM set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def on_cpu(accelerator) -> bool:
    return str(accelerator) == "cpu" or (str(accelerator) == "auto" and not torch.cuda.is_available())


def check_devices_spec(devices, key: str) -> None:
    """Lightning's forms of ``devices``: a count, -1, auto, a list of indices, or "0,1"; ``devices=two`` is
    none of them."""
    parts = (
        devices.split(",") if isinstance(devices, str) else list(devices) if OmegaConf.is_list(devices) else [devices]
    )
    if devices == "auto" or all(str(p).strip().lstrip("-").isdigit() and not isinstance(p, bool) for p in parts):
        return
    raise ConfigError(f"{key}={devices} is not a device count; use e.g. {key}=1, {key}=auto or {key}=[0,1]")


def check_cpu_devices(devices, accelerator, key: str = "trainer.devices") -> None:
    """One process per CPU device: more processes than cores only thrash and exhaust memory."""
    check_devices_spec(devices, key)
    if not on_cpu(accelerator) or isinstance(devices, str) and not devices.strip().isdigit():
        return  # auto, -1, "0,1" and GPU counts are Lightning's and SLURM's to check
    count = whole(int(devices) if isinstance(devices, str) else devices, key, example=1)
    if count > cores():
        raise ConfigError(
            f"{key}={devices} processes on the CPU, but this machine has {cores()} core(s); "
            f"use {key}=1 (or at most {cores()}), or run on GPUs"
        )


def check_training(cfg) -> None:
    """train.py's numbers: batch size, learning rate, step budget and CPU processes."""
    whole(cfg.data.batch_size, "data.batch_size", example="64")
    positive(cfg.model.optimizer.lr, "model.optimizer.lr", example="1e-4")
    if cfg.trainer.max_steps != -1:
        whole(cfg.trainer.max_steps, "trainer.max_steps", example="2000 (or -1 for no limit)")
    whole(cfg.model.get("warmup_steps", 0), "model.warmup_steps", minimum=0, example="0")
    objective = cfg.model.get("objective") or {}
    if "distill" in objective:  # read before the objective is built: it decides whether a teacher is loaded
        boolean(objective.distill, "model.objective.distill")
    check_cpu_devices(cfg.trainer.get("devices", 1), cfg.trainer.get("accelerator", "auto"))


# The most samples one command draws: FID's 50,000 twice over. Samples are held in memory until written, so a
# typo such as num=10^12 stops here instead of filling memory.
NUM_MAX = 100_000


def check_evaluation(cfg) -> None:
    """evaluate.py's numbers and devices, of the options its task has, before anything is read."""
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


def check_device(name) -> None:
    """``device=``: auto, cpu, or a CUDA device that exists."""
    try:
        device = torch.device("cpu" if name == "auto" else str(name))
    except (RuntimeError, ValueError):
        raise ConfigError(f"device={name} is not a device; use device=auto, device=cpu or device=cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA GPU is visible to this process; use device=cpu or device=auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device={name} but this machine has {torch.cuda.device_count()} GPU(s); use device=cuda:0")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={name}: sampling runs on device=cpu or device=cuda")
