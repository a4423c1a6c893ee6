"""A non-editable install works on its own: the console commands find the configs shipped inside the package
and run from a directory that is not the checkout."""

import os
import site
import subprocess
import sys

import pytest
from helpers import ROOT, TINY


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing may come from the checkout
    return {**env, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def _run(*cmd, cwd) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


@pytest.mark.slow
def test_installed_commands_train_and_evaluate_elsewhere(tmp_path):
    venv, work = tmp_path / "venv", tmp_path / "elsewhere"
    work.mkdir()
    # The dependencies and the build backend come from this interpreter's site-packages (no venv pip, whose
    # bundled setuptools would shadow them), so nothing is downloaded. A .pth names them: when this interpreter is
    # itself a virtual environment, --system-site-packages would reach the base interpreter's instead, whose
    # older setuptools cannot build a wheel.
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (venv / "lib" / version / "site-packages" / "_parent_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    bin_dir = venv / "bin"
    _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        bin_dir / "python",
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        ROOT,
        cwd=work,
    )
    where = _run(
        bin_dir / "python", "-c", "import cm_lightning.cli as c; print(c.__file__); print(c.config_dir())", cwd=work
    ).split()
    assert all(p.startswith(str(venv)) for p in where), where  # the installed package and its configs

    _run(bin_dir / "cm-train", *TINY, "trainer.max_steps=5", "logger=csv", "hydra.run.dir=run", cwd=work)
    ckpt = work / "run/checkpoints/last.ckpt"
    assert ckpt.is_file() and (work / "run/train.log").is_file()
    _run(bin_dir / "cm-evaluate", f"ckpt={ckpt}", "num=4", "hydra.run.dir=eval", cwd=work)
    assert (work / "eval/samples_1step.png").is_file() and (work / "eval/samples_2step.npz").is_file()


def test_missing_optional_dependency_names_its_extra(monkeypatch, capsys):
    from cm_lightning.cli import user_errors

    def train_on_lsun():
        import lmdb  # noqa: F401

    monkeypatch.setitem(sys.modules, "lmdb", None)  # as if the lsun extra were not installed
    with pytest.raises(SystemExit) as stop:
        user_errors(train_on_lsun)()
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: lmdb is not installed; pip install 'cm-lightning[lsun]'\n"
