"""Each user mistake stops before training or sampling, with one message naming the value and the fix."""

import pytest

from conftest import TINY, run_script


def fails(script, *overrides):
    proc = run_script(script, *overrides, check=False)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Epoch 0" not in proc.stderr + proc.stdout  # nothing was trained
    return proc.stderr


def test_missing_teacher_checkpoint(tmp_path):
    err = fails("train.py", "experiment=digits_cd", *TINY, "logger=none", f"hydra.run.dir={tmp_path}")
    assert "model.teacher_ckpt is not set" in err and "experiment=digits_edm" in err
    err = fails("train.py", "experiment=digits_cd", "model.teacher_ckpt=/no/such.ckpt", *TINY, "logger=none",
                f"hydra.run.dir={tmp_path}")
    assert "model.teacher_ckpt=/no/such.ckpt does not exist" in err


def test_teacher_with_another_architecture(edm_run, tmp_path):
    err = fails("train.py", "experiment=digits_cd", f"model.teacher_ckpt={edm_run / 'checkpoints/last.ckpt'}",
                *TINY, "net.model_channels=32", "logger=none", f"hydra.run.dir={tmp_path}")
    assert "does not match the configured network" in err and "model.init_from_teacher=false" in err


def test_teacher_that_is_not_edm(cd_run, tmp_path):
    err = fails("train.py", "experiment=digits_cd", f"model.teacher_ckpt={cd_run / 'checkpoints/last.ckpt'}",
                *TINY, "logger=none", f"hydra.run.dir={tmp_path}")
    assert "is a consistency model's checkpoint" in err


def test_data_path_that_does_not_exist(tmp_path):
    err = fails("train.py", "data=image_folder", "data.root=/no/such/folder", "data.image_size=16", *TINY,
                "logger=none", f"hydra.run.dir={tmp_path}")
    assert "data.root=/no/such/folder is not a directory" in err


def test_image_size_the_network_cannot_take(tmp_path):
    err = fails("train.py", "data.image_size=15", *TINY, "logger=none", f"hydra.run.dir={tmp_path}")
    assert "image_size=15" in err


def test_unknown_experiment(tmp_path):
    proc = run_script("train.py", "experiment=digits_nope", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "digits_nope" in proc.stderr and "digits_ct" in proc.stderr  # Hydra lists the available ones


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_multistep_schedule_not_decreasing(script, cd_run, tmp_path):
    if script == "train.py":
        err = fails(script, *TINY, "callbacks.sample_grid.sigmas=[[1.0,2.0]]", "logger=none",
                    f"hydra.run.dir={tmp_path}")
    else:
        err = fails(script, f"ckpt={cd_run / 'checkpoints/last.ckpt'}", "sigmas=[80.0,80.0]",
                    f"hydra.run.dir={tmp_path}")
    assert "strictly decreasing" in err


def test_evaluate_missing_checkpoint(tmp_path):
    err = fails("evaluate.py", "ckpt=/no/such.ckpt", f"hydra.run.dir={tmp_path}")
    assert "ckpt=/no/such.ckpt does not exist" in err


def test_unknown_mu_divisor(tmp_path):
    err = fails("train.py", "experiment=digits_ct", "model.objective.pair.schedule.mu_divisor=authors", *TINY, "logger=none",
                f"hydra.run.dir={tmp_path}")
    assert [line for line in err.splitlines() if "mu_divisor" in line] == [err.strip().splitlines()[-1]]
    assert "mu_divisor='authors'" in err and "'code'" in err
