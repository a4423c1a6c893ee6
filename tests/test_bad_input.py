"""Each user mistake stops before training or sampling, with one message naming the value and the fix."""

import hashlib
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from helpers import TINY
from helpers.launch import fails, run_script
from omegaconf import OmegaConf
from PIL import Image


def test_missing_teacher_checkpoint(tmp_path):
    err = fails("train.py", "experiment=digits_cd", *TINY, "logger=none", f"hydra.run.dir={tmp_path}")
    assert "model.teacher_ckpt is not set" in err and "experiment=digits_edm" in err
    err = fails(
        "train.py",
        "experiment=digits_cd",
        "model.teacher_ckpt=/no/such.ckpt",
        *TINY,
        "logger=none",
        f"hydra.run.dir={tmp_path}",
    )
    assert "model.teacher_ckpt=/no/such.ckpt does not exist" in err


def test_teacher_with_another_architecture(edm_run, tmp_path):
    err = fails(
        "train.py",
        "experiment=digits_cd",
        f"model.teacher_ckpt={edm_run / 'checkpoints/last.ckpt'}",
        *TINY,
        "net.model_channels=32",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
    )
    assert "does not match the configured network" in err and "model.init_from_teacher=false" in err


def test_teacher_fed_another_conditioning(edm_run, tmp_path):
    err = fails(
        "train.py",
        "experiment=digits_cd",
        f"model.teacher_ckpt={edm_run / 'checkpoints/last.ckpt'}",
        *TINY,
        "net.noise_kind=adm",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
    )
    assert "noise_kind=adm here, edm for the teacher; set net.noise_kind=edm" in err


def test_teacher_that_is_not_edm(cd_run, tmp_path):
    err = fails(
        "train.py",
        "experiment=digits_cd",
        f"model.teacher_ckpt={cd_run / 'checkpoints/last.ckpt'}",
        *TINY,
        "logger=none",
        f"hydra.run.dir={tmp_path}",
    )
    assert "is a consistency model's checkpoint" in err


def test_data_path_that_does_not_exist(tmp_path):
    err = fails(
        "train.py",
        "data=image_folder",
        "data.root=/no/such/folder",
        "data.image_size=16",
        *TINY,
        "logger=none",
        f"hydra.run.dir={tmp_path}",
    )
    assert "data.root=/no/such/folder is not a directory" in err


def test_image_size_the_network_cannot_take(tmp_path):
    err = fails("train.py", "data.image_size=15", *TINY, "logger=none", f"hydra.run.dir={tmp_path}")
    assert "image_size=15" in err


def test_unknown_experiment(tmp_path):
    proc = run_script("train.py", "experiment=digits_nope", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "digits_nope" in proc.stderr and "digits_ct" in proc.stderr  # Hydra lists the available ones


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_multistep_plan_not_decreasing(script, cd_run, tmp_path):
    if script == "train.py":
        err = fails(
            script, *TINY, "callbacks.sample_grid.sigmas=[[1.0,2.0]]", "logger=none", f"hydra.run.dir={tmp_path}"
        )
    else:
        err = fails(
            script, f"ckpt={cd_run / 'checkpoints/last.ckpt'}", "sigmas=[80.0,80.0]", f"hydra.run.dir={tmp_path}"
        )
    assert "strictly decreasing" in err


def test_evaluate_missing_checkpoint(tmp_path):
    err = fails("evaluate.py", "ckpt=/no/such.ckpt", f"hydra.run.dir={tmp_path}")
    assert "ckpt=/no/such.ckpt does not exist" in err


def test_unknown_mu_divisor(tmp_path):
    err = fails(
        "train.py",
        "experiment=digits_ct",
        "model.objective.pair.curriculum.mu_divisor=authors",
        *TINY,
        "logger=none",
        f"hydra.run.dir={tmp_path}",
    )
    assert [line for line in err.splitlines() if "mu_divisor" in line] == [err.strip().splitlines()[-1]]
    assert "mu_divisor='authors'" in err and "'code'" in err


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


@pytest.mark.parametrize(
    "override,names",
    [
        ("data.batch_size=abc", "data.batch_size=abc"),
        ("data.batch_size=0", "data.batch_size=0"),
        ("data.batch_size=-4", "data.batch_size=-4"),
        ("model.optimizer.lr=-1", "model.optimizer.lr=-1"),
        ("trainer.max_steps=abc", "trainer.max_steps=abc"),
        ("trainer.devices=64", "trainer.devices=64"),
    ],
)
def test_training_numbers(override, names, tmp_path):
    one_line(
        "train.py", *TINY, override, "trainer.accelerator=cpu", "logger=none", f"hydra.run.dir={tmp_path}", names=names
    )


@pytest.mark.parametrize("content", [b"", b"this is a text file, not a checkpoint\n"])
@pytest.mark.parametrize("script,key", [("train.py", "model.teacher_ckpt"), ("evaluate.py", "ckpt")])
def test_a_file_that_is_not_a_checkpoint(script, key, content, tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(content)
    extra = ["experiment=digits_cd", *TINY, "logger=none"] if script == "train.py" else []
    message = one_line(
        script, *extra, f"{key}={bad}", f"hydra.run.dir={tmp_path / 'run'}", names=f"{key}={bad}", watch=[tmp_path]
    )
    assert "not a PyTorch checkpoint" in message


@pytest.mark.parametrize(
    "override,names",
    [
        ("num=0", "num=0"),
        ("num=-5", "num=-5"),
        ("batch_size=0", "batch_size=0"),
        ("steps=[0]", "steps=[0]"),
        ("sigmas=[1000.0,0.0001]", "sigmas=[1000.0, 0.0001]"),
        ("task=fid trainer.devices=64", "trainer.devices=64"),
        ("device=cuda", "device=cuda"),
    ],
)
def test_sampling_numbers(override, names, cd_run, tmp_path):
    if override == "device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    one_line(
        "evaluate.py",
        f"ckpt={cd_run / 'checkpoints/last.ckpt'}",
        *override.split(),
        f"hydra.run.dir={tmp_path}",
        names=names,
        watch=[cd_run],
    )


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels and that holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(200_000, 200_000), (10_000, 10_000)])
@pytest.mark.parametrize("reader", ["editing input", "training folder"])
def test_an_oversized_image_is_skipped_with_a_warning_naming_it(reader, size, tmp_path, caplog):
    from cm_lightning.data.image_folder import ImageFolderDataModule
    from cm_lightning.tasks.editing_inputs import read_images

    (tmp_path / "bomb.png").write_bytes(png_header(*size))
    Image.new("RGB", (16, 16)).save(tmp_path / "good.png")
    if reader == "editing input":
        names = [name for name, _ in read_images(OmegaConf.create({"input": str(tmp_path)}), "inpaint")]
    else:
        names = [f.stem for f in ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=1).files]
    assert names == ["good"]
    assert f"skipping {tmp_path / 'bomb.png'}" in caplog.text and "pixels" in caplog.text, caplog.text


# --- nothing is written over without overwrite=true; a resume keeps the method -----------------------------
def snapshot_run(run: Path) -> dict:
    """The run's files but its logs, to which every command started in it appends."""
    return {p: h for p, h in snapshot(run).items() if p.suffix != ".log"}


@pytest.fixture
def finished_run(edm_run, tmp_path) -> Path:
    run = tmp_path / "finished"
    shutil.copytree(edm_run, run)
    return run


def test_export_onto_an_existing_file(finished_run, tmp_path):
    ckpt = finished_run / "checkpoints/last.ckpt"
    message = one_line(
        "evaluate.py",
        "task=export",
        f"ckpt={ckpt}",
        f"export_to={ckpt}",
        f"hydra.run.dir={tmp_path / 'out'}",
        names=f"export_to={ckpt}",
        watch=[finished_run],
    )
    assert "overwrite=true" in message and "another export_to" in message


def test_a_fresh_start_into_a_finished_run(finished_run):
    before = snapshot_run(finished_run)
    message = one_line(
        "train.py",
        "experiment=digits_edm",
        *TINY,
        "logger=none",
        "ckpt_path=null",
        f"hydra.run.dir={finished_run}",
        names=str(finished_run / "checkpoints"),
    )
    assert "overwrite=true" in message and "hydra.run.dir" in message and snapshot_run(finished_run) == before


@pytest.mark.parametrize("into", ["training run", "evaluation"])
def test_evaluate_into_a_directory_that_holds_work(into, finished_run, tmp_path):
    ckpt = finished_run / "checkpoints/last.ckpt"
    out = finished_run if into == "training run" else tmp_path / "eval"
    if into == "evaluation":
        run_script("evaluate.py", f"ckpt={ckpt}", "num=2", f"hydra.run.dir={out}")
    before = snapshot_run(out)
    message = one_line("evaluate.py", f"ckpt={ckpt}", "num=2", f"hydra.run.dir={out}", names=f"out_dir={out}")
    # An earlier evaluation may be replaced with overwrite=true; a training run's directory never is.
    fix = "overwrite=true" if into == "evaluation" else "training run's directory"
    assert fix in message and snapshot_run(out) == before


@pytest.mark.parametrize(
    "change,names",
    [
        (["experiment=digits_edm", "net.model_channels=32"], "model.net.model_channels: 16 -> 32"),
        (
            ["experiment=digits_ct", "net.model_channels=16"],
            "model.objective._target_: cm_lightning.diffusion.objectives.denoising.Denoising -> ",
        ),
    ],
)
def test_resume_with_another_network_or_method(change, names, finished_run):
    before = snapshot_run(finished_run)
    message = one_line("train.py", *TINY, *change, "logger=none", f"hydra.run.dir={finished_run}", names=names)
    assert "start a new run" in message and snapshot_run(finished_run) == before


def test_resume_applies_a_changed_learning_rate(finished_run):
    proc = run_script(
        "train.py",
        "experiment=digits_edm",
        *TINY,
        "trainer.max_steps=6",
        "model.optimizer.lr=3e-5",
        "logger=none",
        f"hydra.run.dir={finished_run}",
    )
    assert "resuming with model.optimizer.lr=3e-05" in proc.stderr + proc.stdout
    ckpt = torch.load(finished_run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == 3e-5


# The in-process tests below cover these values; one CLI run per kind stays in the default suite.
SLOW = pytest.mark.slow


# --- values the constructors and checks refuse, in process (the CLI path of each kind is run once below) -----------
def refused(build, names: str) -> str:
    from cm_lightning.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        build()
    assert names in str(info.value) and "\n" not in str(info.value), str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    "kind,fields,names",
    [
        ("trigflow", {"sigma_data": -1}, "parameterisation.sigma_data=-1"),  # not blamed on t_mid
        ("trigflow", {"sigma_max": 0.001}, "parameterisation.sigma_max=0.001"),
        ("karras", {"sigma_data": 0}, "parameterisation.sigma_data=0"),
        ("meanflow", {"time_scale": 0}, "parameterisation.time_scale=0"),
        ("meanflow", {"time_scale": -1}, "parameterisation.time_scale=-1"),
        ("meanflow", {"sigma_max": -5}, "parameterisation.sigma_max=-5"),
        ("meanflow", {"sigma_min": 100.0}, "parameterisation.sigma_min=100.0 must be below"),
    ],
)
def test_parameterisation_fields(kind, fields, names):
    from cm_lightning.checkpoint import PARAMETERISATIONS

    refused(lambda: PARAMETERISATIONS[kind](**fields), names)


@pytest.mark.parametrize(
    "field,value",
    [("p_mean", float("inf")), ("p_std", "abc"), ("fraction", "abc"), ("fraction", [0.1]), ("omega", float("nan"))],
)
def test_meanflow_fields(field, value):
    from cm_lightning.diffusion.meanflow_param import MeanFlowParam
    from cm_lightning.diffusion.objectives.meanflow import MeanFlow

    message = refused(lambda: MeanFlow(MeanFlowParam(), **{field: value}), f"model.objective.{field}={value}")
    assert "finite number" in message  # omega=nan names omega, not guidance or classes


@pytest.mark.parametrize(
    "options,names",
    [
        ({"sigmas": ["abc"]}, "sigmas=['abc']"),
        ({"num": 10**12}, "num=1000000000000"),
        ({"solver": "rk4"}, "solver=rk4"),
    ],
)
def test_sampling_options(options, names):
    from cm_lightning.inputs import check_evaluation

    refused(lambda: check_evaluation(OmegaConf.create(options)), names)


@pytest.mark.parametrize("devices", ["two", "1,x", True])
def test_device_counts(devices):
    from cm_lightning.inputs import check_cpu_devices

    refused(lambda: check_cpu_devices(devices, "cpu"), f"trainer.devices={devices}")


def test_fid_from_too_few_images_warns(caplog):
    from cm_lightning.metrics.fidelity import warn_rank_deficient

    warn_rank_deficient(5000, 10, 2048)
    assert "10 reference images is unreliable" in caplog.text and "2048" in caplog.text
    caplog.clear()
    warn_rank_deficient(5000, 5000, 2048)
    assert not caplog.text


@pytest.mark.parametrize(
    "overrides,names",
    [
        pytest.param(["experiment=digits_meanflow", "model.objective.fraction=abc"], "fraction=abc", marks=SLOW),
        (["experiment=digits_meanflow", "+model.objective.bogus=1"], "bogus"),  # Hydra-wrapped TypeError
        pytest.param(
            ["experiment=digits_sct", "model.init_from_teacher=false", "model.objective.distill=maybe"],
            "distill=maybe",
            marks=SLOW,
        ),
        pytest.param(["model.warmup_steps=abc"], "model.warmup_steps=abc", marks=SLOW),
        pytest.param(["trainer.devices=two"], "trainer.devices=two", marks=SLOW),
    ],
)
def test_training_values_from_the_command_line(overrides, names, tmp_path):
    message = one_line("train.py", *TINY, *overrides, "logger=none", f"hydra.run.dir={tmp_path}", names=names)
    assert "Error in call to target" not in message


@pytest.mark.parametrize(
    "override,names",
    [
        pytest.param("sigmas=[abc]", "sigmas=['abc']", marks=SLOW),
        pytest.param("num=${oc.env:NOPE}", "num: KeyError raised while resolving interpolation", marks=SLOW),
        pytest.param("num=1000000000000", "num=1000000000000", marks=SLOW),
        ("solver=heun", "solver=heun"),  # the default value, given to a consistency model
    ],
)
def test_sampling_values_from_the_command_line(override, names, cd_run, tmp_path):
    one_line(
        "evaluate.py", f"ckpt={cd_run / 'checkpoints/last.ckpt'}", override, f"hydra.run.dir={tmp_path}", names=names
    )
