"""sCT through ``python train.py``, started from a TrigFlow teacher as digits_sct is: one step on 2 CPU processes
equals one step of one process with the same global batch (the JVP is taken without a graph, the gradient through
Lightning's DDP wrapper), and a run killed mid-way resumes bit for bit, the learned weighting and the tangent warm-up
included."""

import pytest
from helpers import TINY
from helpers.scenarios import every_evaluate_task, killed_and_resumed, two_ranks_and_one


@pytest.fixture
def sct(trigflow_run):
    return [*SCT, f"model.teacher_ckpt={trigflow_run / 'checkpoints/last.ckpt'}"]


SCT = [
    "experiment=digits_sct",
    *TINY,
    "trainer.accelerator=cpu",
    "trainer.deterministic=true",
    "logger=csv",
    "callbacks.metrics.every_n_steps=null",
    "callbacks.metrics.at_end=false",
]


def test_two_ranks_take_the_single_process_sct_step(sct, tmp_path):
    # warmup_steps=0: the JVP's term has its full weight from the first step.
    ddp, _ = two_ranks_and_one([*sct, "model.objective.warmup_steps=0"], tmp_path)
    assert any(k.startswith("objective.weighting.") for k in ddp)


def test_sct_resumes_bit_for_bit_through_the_warm_up(sct, tmp_path):
    full = killed_and_resumed([*sct, "model.objective.warmup_steps=4"], tmp_path)
    assert full["state_dict"]["objective.weighting.linear.weight"].abs().sum() > 0  # trained and saved


def test_every_evaluate_task_runs_on_an_sct_checkpoint(tmp_path):
    """sample, fid, the midpoint search and every editing task run on a checkpoint of the TrigFlow parameterisation
    (trained from scratch on the colour digits, which the grayscale teacher cannot start)."""
    every_evaluate_task([*SCT, "model.init_from_teacher=false"], tmp_path)


def test_bad_scm_settings_stop_before_any_step_with_one_line(edm_run, tmp_path):
    from helpers.launch import fails

    tiny = [*TINY, "logger=none", f"hydra.run.dir={tmp_path}"]
    teacher = f"model.teacher_ckpt={edm_run / 'checkpoints/last.ckpt'}"
    scratch = "model.init_from_teacher=false"
    cases = [
        (["experiment=digits_scd"], "model.teacher_ckpt is not set"),
        (["experiment=digits_sct"], "experiment=digits_trigflow"),
        (
            ["experiment=digits_scd", teacher, "data.image_size=8", "net.attention_resolutions=[4]"],
            "the teacher's net.image_size=16 differs from this run's net.image_size=8",
        ),
        (["experiment=digits_sct", scratch, "model.objective.p_std=0"], "model.objective.p_std=0"),
        (
            ["experiment=digits_sct", scratch, "model.objective.parameterisation.t_mid=2.0"],
            "t_mid=2.0 is outside (0, t_max",
        ),
    ]
    for overrides, message in cases:
        err = fails("train.py", *overrides, *tiny)
        (line,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert message in line, err[-2000:]
