"""Callbacks that the tests add to a real ``python train.py`` run (``+callbacks.<name>._target_=probes.X``,
through ``run`` below) to inject a fault at a chosen step or to record what each rank did."""

import json
import math
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch
from conftest import run_script
from lightning.fabric.plugins.io import torch_io

HERE = Path(__file__).resolve().parent


def run(script: str, *overrides: str, **kwargs):
    """``run_script`` with this directory importable by the run and all its ranks (a package named
    ``tests`` in site-packages shadows ours)."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), saved) if p)
    try:
        return run_script(script, *overrides, **kwargs)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved


class KillAt(L.Callback):
    """SIGKILL (or another signal) to this process when optimiser step ``step`` is about to start."""

    def __init__(self, step: int, signal_name: str = "SIGKILL"):
        self.step, self.signum = step, getattr(signal, signal_name)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class PoisonAt(L.Callback):
    """Turns the inputs of step ``step`` into ``value`` (NaN or inf), so that its loss is not finite."""

    def __init__(self, step: int, value: float = math.nan):
        self.step, self.value = step, value

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch[0].fill_(self.value)


class SlowDown(L.Callback):
    """Sleeps after each step, so that a test has time to signal a job in the middle of its run."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


class StartLog(L.Callback):
    """Appends the step each start of the run begins at to ``starts.txt`` in the run directory."""

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            with open(Path(trainer.default_root_dir) / "starts.txt", "a") as f:
                f.write(f"{trainer.global_step}\n")


class RankProbe(L.Callback):
    """Writes ``probe.json`` in the run directory: every rank's training batches (their sums) and a
    checksum of its net, EMAs and target network at the end, gathered on rank 0."""

    def __init__(self):
        self.batch_sums = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_sums.append(float(batch[0].double().sum()))

    def on_train_end(self, trainer, pl_module):
        parts = {name: getattr(pl_module, name) for name in ("net", "ema", "target_net")}
        sums = [float(sum(p.double().sum() * (i + 1) for i, p in enumerate(m.parameters()))) for m in parts.values()]
        local = torch.tensor([sums + self.batch_sums], dtype=torch.float64, device=pl_module.device)
        gathered = trainer.strategy.all_gather(local).reshape(trainer.world_size, -1).cpu().tolist()
        if trainer.is_global_zero:
            ranks = [{"weights": dict(zip(parts, row[:3])), "batches": row[3:]} for row in gathered]
            (Path(trainer.default_root_dir) / "probe.json").write_text(json.dumps(ranks))


def write_then_kill(checkpoint, filepath) -> None:
    """Lightning's checkpoint write, killed with SIGKILL when half of the bytes are on disk."""
    import io

    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    data = buffer.getvalue()
    with open(filepath, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


def kill_during_writes() -> None:
    torch_io._atomic_save = write_then_kill


EDIT_TASKS = ["inpaint", "colorize", "superres", "stroke", "denoise", "interpolate"]


def every_evaluate_task(train_overrides, tmp_path: Path) -> None:
    """Trains two steps on the colour digits with ``train_overrides``, then runs sample, fid, the midpoint search
    (through the ts grid) and every editing task on the checkpoint, checking each wrote its output: the samplers,
    the metrics and Algorithm 4 take the parameterisation from the checkpoint."""
    from torchvision.utils import save_image

    from cm_lightning.data.digits import colour_digits_tensor

    run("train.py", *train_overrides, "data=digits_colour", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}")
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
    run(
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
        run(
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
    run("train.py", *every, f"hydra.run.dir={tmp_path / 'full'}")
    killed = run(
        "train.py",
        *every,
        f"hydra.run.dir={tmp_path / 'resumed'}",
        "+callbacks.kill._target_=probes.KillAt",
        f"+callbacks.kill.step={kill_at}",
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    run("train.py", *every, f"hydra.run.dir={tmp_path / 'resumed'}")
    full, resumed = last_checkpoint(tmp_path / "full"), last_checkpoint(tmp_path / "resumed")
    assert full["global_step"] == resumed["global_step"] == steps
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for a, b in zip(full["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    return full
