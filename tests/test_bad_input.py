"""Each user mistake stops before training or sampling, with one message naming the value and the fix."""

import hashlib
import struct
import zlib
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

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
    assert "'consistency' checkpoint" in err


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


# --- each bad value: exit code 2, one line naming it, no file that existed changed --------------------
def snapshot(*roots) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for r in roots for p in Path(r).rglob("*") if p.is_file()}


def one_line(script, *overrides, names: str, watch=(), code: int = 2) -> str:
    """Runs the command; asserts it exits with ``code``, prints one error line containing ``names`` and no
    traceback, and leaves every file under ``watch`` as it was."""
    before = snapshot(*watch)
    proc = run_script(script, *overrides, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and names in errors[0], proc.stderr[-3000:]
    after = snapshot(*watch)
    assert {p: after.get(p) for p in before} == before, "a file that existed changed"
    return errors[0]


@pytest.mark.parametrize("override,names", [
    ("data.batch_size=abc", "data.batch_size=abc"), ("data.batch_size=0", "data.batch_size=0"),
    ("data.batch_size=-4", "data.batch_size=-4"), ("model.optimizer.lr=-1", "model.optimizer.lr=-1"),
    ("trainer.max_steps=abc", "trainer.max_steps=abc"), ("trainer.devices=64", "trainer.devices=64"),
])
def test_training_numbers(override, names, tmp_path):
    one_line("train.py", *TINY, override, "trainer.accelerator=cpu", "logger=none", f"hydra.run.dir={tmp_path}",
             names=names)


@pytest.mark.parametrize("content", [b"", b"this is a text file, not a checkpoint\n"])
@pytest.mark.parametrize("script,key", [("train.py", "model.teacher_ckpt"), ("evaluate.py", "ckpt")])
def test_a_file_that_is_not_a_checkpoint(script, key, content, tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(content)
    extra = ["experiment=digits_cd", *TINY, "logger=none"] if script == "train.py" else []
    message = one_line(script, *extra, f"{key}={bad}", f"hydra.run.dir={tmp_path / 'run'}", names=f"{key}={bad}",
                       watch=[tmp_path])
    assert "not a PyTorch checkpoint" in message


@pytest.mark.parametrize("override,names", [
    ("num=0", "num=0"), ("num=-5", "num=-5"), ("batch_size=0", "batch_size=0"), ("steps=[0]", "steps=[0]"),
    ("sigmas=[1000.0,0.0001]", "sigmas=[1000.0, 0.0001]"), ("trainer.devices=64", "trainer.devices=64"),
    ("device=cuda", "device=cuda"),
])
def test_sampling_numbers(override, names, cd_run, tmp_path):
    if override == "device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    one_line("evaluate.py", f"ckpt={cd_run / 'checkpoints/last.ckpt'}", override, f"hydra.run.dir={tmp_path}",
             names=names, watch=[cd_run])


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels and that holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(200_000, 200_000), (10_000, 10_000)])
def test_an_oversized_image_is_skipped_with_a_warning_naming_it(size, tmp_path, caplog):
    from cm_lightning.editing_inputs import read_images

    (tmp_path / "bomb.png").write_bytes(png_header(*size))
    Image.new("RGB", (16, 16)).save(tmp_path / "good.png")
    images = read_images(OmegaConf.create({"input": str(tmp_path)}), "inpaint")
    assert [name for name, _ in images] == ["good"]
    assert f"skipping {tmp_path / 'bomb.png'}" in caplog.text and "pixels" in caplog.text, caplog.text
