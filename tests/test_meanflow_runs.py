"""MeanFlow through ``python train.py``: one step on 2 CPU processes equals one step of one process with the same
global batch (the JVP is taken without a graph, the gradient through Lightning's DDP wrapper), a run killed
mid-way resumes bit for bit, every evaluate task runs on a MeanFlow checkpoint, and bad settings stop before any
step with one line."""

import signal

import torch

from conftest import TINY
from probes import every_evaluate_task, run

MEANFLOW = ["experiment=digits_meanflow", *TINY, "trainer.accelerator=cpu", "trainer.deterministic=true",
            "logger=csv", "callbacks.metrics.every_n_steps=null", "callbacks.metrics.at_end=false"]


def trained(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)


def test_two_ranks_take_the_single_process_meanflow_step(tmp_path):
    one_step = [*MEANFLOW, "trainer.max_steps=1", "net.dropout=0.1"]
    run("train.py", *one_step, "trainer.devices=2", f"hydra.run.dir={tmp_path / 'ddp'}", timeout=400)
    run("train.py", *one_step, "trainer.devices=1", f"hydra.run.dir={tmp_path / 'single'}", timeout=400)
    ddp, single = (trained(tmp_path / name)["state_dict"] for name in ("ddp", "single"))
    assert ddp.keys() == single.keys() and any(k.startswith("net.time_embed2.") for k in ddp)
    assert trained(tmp_path / "ddp")["global_step"] == 1
    for key in ddp:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-6, msg=key)


def test_meanflow_resumes_bit_for_bit(tmp_path):
    steps = [*MEANFLOW, "trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=2"]
    run("train.py", *steps, f"hydra.run.dir={tmp_path / 'full'}")
    killed = run("train.py", *steps, f"hydra.run.dir={tmp_path / 'resumed'}", "+callbacks.kill._target_=probes.KillAt",
                 "+callbacks.kill.step=3", check=False)
    assert killed.returncode == -signal.SIGKILL
    run("train.py", *steps, f"hydra.run.dir={tmp_path / 'resumed'}")
    full, resumed = trained(tmp_path / "full"), trained(tmp_path / "resumed")
    assert full["global_step"] == resumed["global_step"] == 6
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for a, b in zip(full["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def test_every_evaluate_task_runs_on_a_meanflow_checkpoint(tmp_path):
    """sample, fid, the midpoint search and every editing task run on a checkpoint of the MeanFlow parameterisation."""
    every_evaluate_task(MEANFLOW, tmp_path)


def test_bad_meanflow_settings_stop_before_any_step_with_one_line(tmp_path):
    from test_bad_input import fails

    tiny = ["experiment=digits_meanflow", *TINY, "logger=none", f"hydra.run.dir={tmp_path}"]
    cases = [
        (["model.objective.norm_p=-1"], "model.objective.norm_p=-1"),
        (["model.objective.norm_c=0"], "model.objective.norm_c=0"),
        (["model.objective.fraction=1.5"], "model.objective.fraction=1.5"),
        (["model.objective.p_std=0"], "model.objective.p_std=0"),
        (["net.num_times=1"], "net.num_times=1: MeanFlow's network takes two times"),
        (["model.objective.omega=2.0"], "net.null_class=true"),
    ]
    for overrides, message in cases:
        err = fails("train.py", *tiny, *overrides)
        (line,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert message in line, err[-2000:]
