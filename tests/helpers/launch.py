"""Every way a test starts ``train.py`` or ``evaluate.py``.

In a subprocess, as a user types it: ``run_script(script, *overrides, check=, timeout=, threads=)`` (and
``fails``, for a run that must stop with a message); ``command`` and ``environment`` for a test that manages
the process itself. In this process: ``train_here(overrides, run_dir)``, ``evaluate_here(overrides, run_dir)``
and ``compose_run(config_name, overrides, run_dir)``, what ``python train.py ...`` and ``python evaluate.py ...``
do minus the seconds each new interpreter spends importing torch and Lightning."""

import os
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, TESTS


def environment(threads: int = 1) -> dict[str, str]:
    """The environment of a launched run: W&B offline unless the caller's says otherwise, Hydra's short errors,
    ``threads`` as its OMP_NUM_THREADS (1 keeps parallel runs from oversubscribing the cores), and tests/ on
    PYTHONPATH, so that the run and all its ranks import ``helpers.probes`` (a package named ``tests`` in
    site-packages shadows ours)."""
    return {
        **os.environ,
        "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
        "HYDRA_FULL_ERROR": "0",
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p),
    }


def command(script: str, *overrides: str) -> list[str]:
    """``python <script> <overrides>`` with this interpreter; run it with ``cwd=ROOT``."""
    return [sys.executable, str(ROOT / script), *overrides]


def run_script(
    script: str, *overrides: str, check: bool = True, timeout: int = 600, threads: int = 1
) -> subprocess.CompletedProcess:
    """``python <script> <overrides>`` in a subprocess, in the checkout's root, with ``environment(threads)``;
    ``check``: fail the test (with the run's output tails) unless it exits with 0."""
    proc = subprocess.run(
        command(script, *overrides),
        cwd=ROOT,
        env=environment(threads),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(overrides)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def fails(script: str, *overrides: str) -> str:
    """The stderr of a run that must stop before it trains anything, with a message and no traceback."""
    proc = run_script(script, *overrides, check=False)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Epoch 0" not in proc.stderr + proc.stdout  # nothing was trained
    return proc.stderr


def compose_run(config_name: str, overrides, run_dir: Path):
    """The composed config with ``${hydra:...}`` resolving as in a run whose output directory is ``run_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from cm_lightning.cli import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def train_here(overrides, run_dir: Path) -> Path:
    from cm_lightning.training import train

    return train(compose_run("train", overrides, run_dir))


def evaluate_here(overrides, run_dir: Path):
    from cm_lightning.tasks.dispatch import evaluate

    return evaluate(compose_run("evaluate", overrides, run_dir))
