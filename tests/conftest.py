"""The session's shared runs, as pytest fixtures; every other shared helper is in the ``helpers`` package."""

import sys
from pathlib import Path

import pytest

# pytest's default (prepend) import mode puts tests/ on sys.path already, for this file and the test modules;
# this keeps ``helpers`` importable under --import-mode=importlib too.
sys.path.insert(0, str(Path(__file__).parent))

from helpers import TINY  # noqa: E402
from helpers.launch import run_script  # noqa: E402


@pytest.fixture(scope="session")
def edm_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("edm")
    run_script("train.py", "experiment=digits_edm", *TINY, "logger=csv", f"hydra.run.dir={out}")
    return out


@pytest.fixture(scope="session")
def trigflow_run(tmp_path_factory) -> Path:
    """The TrigFlow teacher that digits_sct and digits_scd start from."""
    out = tmp_path_factory.mktemp("trigflow")
    run_script("train.py", "experiment=digits_trigflow", *TINY, "logger=csv", f"hydra.run.dir={out}")
    return out


@pytest.fixture(scope="session")
def cd_run(tmp_path_factory, edm_run) -> Path:
    out = tmp_path_factory.mktemp("cd")
    run_script(
        "train.py",
        "experiment=digits_cd",
        f"model.teacher_ckpt={edm_run / 'checkpoints/last.ckpt'}",
        *TINY,
        "logger=csv",
        f"hydra.run.dir={out}",
    )
    return out


@pytest.fixture(scope="session")
def sweep(tmp_path_factory) -> Path:
    """A 2-job Hydra sweep (two learning rates) of tiny digits iCT runs, measured (FID, IS) at steps 2 and 4,
    logging to W&B (offline) and CSV."""
    out = tmp_path_factory.mktemp("sweep")
    run_script(
        "train.py",
        "--multirun",
        "experiment=digits_ict",
        *TINY,
        "model.optimizer.lr=0.001,0.002",
        "callbacks.metrics.every_n_steps=2",
        "callbacks.metrics.num=50",
        "callbacks.metrics.batch_size=50",
        "callbacks.throughput.window_size=2",
        "logger=default",
        f"hydra.sweep.dir={out}",
    )
    return out
