"""Multi-run checks that several test modules repeat with their own overrides: every evaluate task on a fresh
checkpoint, two ranks against one, a killed and resumed run against an uninterrupted one."""

import signal
from pathlib import Path

import torch

from helpers.launch import run_script

EDIT_TASKS = ["inpaint", "colorize", "superres", "stroke", "denoise", "interpolate"]


def every_evaluate_task(train_overrides, tmp_path: Path) -> None:
    """Trains two steps on the colour digits with ``train_overrides``, then runs sample, fid, the midpoint search
    (through the ts grid) and every editing task on the checkpoint, checking each wrote its output: the samplers,
    the metrics and Algorithm 4 take the parameterisation from the checkpoint."""
    from torchvision.utils import save_image

    from cm_lightning.data.digits import colour_digits_tensor

    run_script(
        "train.py", *train_overrides, "data=digits_colour", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"
    )
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i, image in enumerate(colour_digits_tensor(16)[0][:2]):
        save_image((image + 1) / 2, folder / f"d{i}.png")
    common = [
        f"ckpt={tmp_path / 'run/checkpoints/last.ckpt'}",
        "num=20",
        "batch_size=10",
        f"input={folder}",
        f"hydra.sweep.dir={tmp_path / 'eval'}",
        "hydra.sweep.subdir=${task}",
        "metrics.reference_num=40",
        "search_budget=40",
        "ts_num_scales=5",
    ]
    run_script(
        "evaluate.py", "-m", f"task={','.join(['sample', 'fid', 'search_midpoint', *EDIT_TASKS])}", *common, timeout=600
    )
    out = tmp_path / "eval"
    assert (out / "sample/samples_2step.npz").exists() and (out / "fid/metrics.json").exists()
    assert (out / "search_midpoint/search_midpoint.json").exists()
    assert all((out / task / f"{task}.png").exists() for task in EDIT_TASKS if task != "interpolate")
    assert list((out / "interpolate").glob("*.png"))


def last_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)


def two_ranks_and_one(overrides, tmp_path: Path) -> tuple[dict, dict]:
    """One optimiser step with ``overrides`` on 2 CPU processes and on 1: both state dicts, checked equal."""
    for name, devices in (("ddp", 2), ("single", 1)):
        run_script(
            "train.py",
            *overrides,
            "trainer.max_steps=1",
            f"trainer.devices={devices}",
            f"hydra.run.dir={tmp_path / name}",
            timeout=400,
        )
    ddp, single = (last_checkpoint(tmp_path / name) for name in ("ddp", "single"))
    assert ddp["global_step"] == 1 and ddp["state_dict"].keys() == single["state_dict"].keys()
    for key in ddp["state_dict"]:
        torch.testing.assert_close(ddp["state_dict"][key], single["state_dict"][key], rtol=0, atol=1e-6, msg=key)
    return ddp["state_dict"], single["state_dict"]


def killed_and_resumed(overrides, tmp_path: Path, steps: int = 6, kill_at: int = 3) -> dict:
    """A run SIGKILLed before step ``kill_at`` and started again ends bit for bit where an uninterrupted one does
    (weights, EMAs, the objective's own parameters, the optimiser); returns the uninterrupted checkpoint."""
    every = [*overrides, f"trainer.max_steps={steps}", "callbacks.checkpoint.every_n_train_steps=2"]
    run_script("train.py", *every, f"hydra.run.dir={tmp_path / 'full'}")
    killed = run_script(
        "train.py",
        *every,
        f"hydra.run.dir={tmp_path / 'resumed'}",
        "+callbacks.kill._target_=helpers.probes.KillAt",
        f"+callbacks.kill.step={kill_at}",
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    run_script("train.py", *every, f"hydra.run.dir={tmp_path / 'resumed'}")
    full, resumed = last_checkpoint(tmp_path / "full"), last_checkpoint(tmp_path / "resumed")
    assert full["global_step"] == resumed["global_step"] == steps
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for a, b in zip(full["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    return full
