"""sCT through ``python train.py``: one step on 2 CPU processes equals one step of one process with the same global
batch (the JVP is taken without a graph, the gradient through Lightning's DDP wrapper), and a run killed mid-way
resumes bit for bit, the learned weighting and the tangent warm-up included."""

import signal

import torch

from conftest import TINY
from probes import every_evaluate_task, run

SCT = ["experiment=digits_sct", *TINY, "trainer.accelerator=cpu", "trainer.deterministic=true", "logger=csv",
       "callbacks.metrics.every_n_steps=null", "callbacks.metrics.at_end=false"]


def trained(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)


def test_two_ranks_take_the_single_process_sct_step(tmp_path):
    # warmup_steps=0: the JVP's term has its full weight from the first step.
    one_step = [*SCT, "trainer.max_steps=1", "model.objective.warmup_steps=0"]
    run("train.py", *one_step, "trainer.devices=2", f"hydra.run.dir={tmp_path / 'ddp'}", timeout=400)
    run("train.py", *one_step, "trainer.devices=1", f"hydra.run.dir={tmp_path / 'single'}", timeout=400)
    ddp, single = (trained(tmp_path / name)["state_dict"] for name in ("ddp", "single"))
    assert ddp.keys() == single.keys() and any(k.startswith("objective.weighting.") for k in ddp)
    assert trained(tmp_path / "ddp")["global_step"] == 1
    for key in ddp:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-6, msg=key)


def test_sct_resumes_bit_for_bit_through_the_warm_up(tmp_path):
    steps = [*SCT, "trainer.max_steps=6", "model.objective.warmup_steps=4", "callbacks.checkpoint.every_n_train_steps=2"]
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
    weighting = full["state_dict"]["objective.weighting.linear.weight"]
    assert weighting.abs().sum() > 0  # the learned weighting trained and was saved
    for a, b in zip(full["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def test_every_evaluate_task_runs_on_an_sct_checkpoint(tmp_path):
    """sample, fid, the midpoint search and every editing task run on a checkpoint of the TrigFlow parameterisation."""
    every_evaluate_task(SCT, tmp_path)


def test_bad_scm_settings_stop_before_any_step_with_one_line(edm_run, tmp_path):
    from test_bad_input import fails

    tiny = [*TINY, "logger=none", f"hydra.run.dir={tmp_path}"]
    teacher = f"model.teacher_ckpt={edm_run / 'checkpoints/last.ckpt'}"
    cases = [
        (["experiment=digits_scd"], "model.teacher_ckpt is not set"),
        (["experiment=digits_scd", teacher, "data.image_size=8", "net.attention_resolutions=[4]"],
         "the teacher's net.image_size=16 differs from this run's net.image_size=8"),
        (["experiment=digits_sct", "model.objective.p_std=0"], "model.objective.p_std=0"),
        (["experiment=digits_sct", "model.objective.parameterisation.t_mid=2.0"], "t_mid=2.0 is outside (0, t_max"),
    ]
    for overrides, message in cases:
        err = fails("train.py", *overrides, *tiny)
        (line,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert message in line, err[-2000:]
