"""MeanFlow through ``python train.py``: one step on 2 CPU processes equals one step of one process with the same
global batch (the JVP is taken without a graph, the gradient through Lightning's DDP wrapper), a run killed
mid-way resumes bit for bit, every evaluate task runs on a MeanFlow checkpoint, and bad settings stop before any
step with one line."""

from helpers import TINY
from helpers.scenarios import every_evaluate_task, killed_and_resumed, two_ranks_and_one

MEANFLOW = [
    "experiment=digits_meanflow",
    *TINY,
    "trainer.accelerator=cpu",
    "trainer.deterministic=true",
    "logger=csv",
    "callbacks.metrics.every_n_steps=null",
    "callbacks.metrics.at_end=false",
]


def test_two_ranks_take_the_single_process_meanflow_step(tmp_path):
    ddp, _ = two_ranks_and_one([*MEANFLOW, "net.dropout=0.1"], tmp_path)
    assert any(k.startswith("net.time_embed2.") for k in ddp)


def test_meanflow_resumes_bit_for_bit(tmp_path):
    killed_and_resumed(MEANFLOW, tmp_path)


def test_every_evaluate_task_runs_on_a_meanflow_checkpoint(tmp_path):
    """sample, fid, the midpoint search and every editing task run on a checkpoint of the MeanFlow parameterisation."""
    every_evaluate_task(MEANFLOW, tmp_path)


def test_bad_meanflow_settings_stop_before_any_step_with_one_line(tmp_path):
    from helpers.launch import fails

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
