import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

# Shrinks any digits experiment to seconds on a CPU (conf/debug/tiny.yaml, which users run the same way).
TINY = ["+debug=tiny"]


def run_script(
    script: str, *overrides: str, check: bool = True, timeout: int = 600, threads: int = 1
) -> subprocess.CompletedProcess:
    """``python <script> <overrides>`` in a subprocess; ``threads``: its OMP_NUM_THREADS (1 keeps parallel runs
    from oversubscribing the cores)."""
    env = {
        **os.environ,
        "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
        "HYDRA_FULL_ERROR": "0",
        "OMP_NUM_THREADS": str(threads),
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(overrides)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def edm_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("edm")
    run_script("train.py", "experiment=digits_edm", *TINY, "logger=csv", f"hydra.run.dir={out}")
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
    """A 2-job Hydra sweep (two learning rates) of tiny digits CT runs, measured (FID, IS) at steps 2 and 4,
    logging to W&B (offline) and CSV."""
    out = tmp_path_factory.mktemp("sweep")
    run_script(
        "train.py",
        "--multirun",
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
