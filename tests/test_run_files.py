"""The files a run leaves are data to every later command: the report escapes what it reads and refuses what
does not fit metrics.json's schema, a damaged metrics.json never stops a resume, and every file the project
writes appears whole or not at all, a full disk stopping with one line."""

import html
import json
import shutil
import subprocess

import pytest
from omegaconf import OmegaConf

from cm_lightning.callbacks.metrics import earlier_history
from cm_lightning.errors import ConfigError
from cm_lightning.runtime import atomic
from cm_lightning.tasks import report

MARKUP = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "<svg onload=alert(1)>"]


def fake_run(path, sampling="1step", nfe=1, step=2, num=10, reference="digits", extractor="digits-classifier"):
    path.mkdir(parents=True)
    history = [{"step": step, "results": {sampling: {"nfe": nfe, "fid": 3.5, "is": 1.5}}}]
    payload = dict(reference=reference, feature_extractor=extractor, num=num, wandb=None, history=history)
    (path / "metrics.json").write_text(json.dumps(payload))
    return path


def write_report(runs, out, title="report"):
    cfg = OmegaConf.create(dict(runs=[str(r) for r in runs], out_dir=str(out), report=dict(wandb=False, title=title)))
    report.report_task(cfg)
    return (out / "report.html").read_text()


@pytest.mark.parametrize("markup", MARKUP)
def test_the_report_escapes_every_string_it_writes(markup, tmp_path):
    runs = [
        fake_run(tmp_path / f"{markup}a", sampling=markup, reference=markup, extractor=markup),
        fake_run(tmp_path / f"{markup}b", sampling=markup, reference=markup, extractor=markup),
    ]
    for i, run in enumerate(runs):
        (run / ".hydra").mkdir()
        (run / ".hydra/overrides.yaml").write_text(json.dumps([f"x={markup}{i}"]))
    page = write_report(runs, tmp_path / "out", title=markup)
    assert markup not in page and html.escape(markup) in page
    assert page.count("&lt;") >= 6  # title, reference, extractor, sampling, run names, overrides


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda d: d.update(num="<script>"), "num='<script>' is not an integer"),
        (lambda d: d["history"][0].update(step="<svg onload=1>"), "has no integer step"),
        (lambda d: d["history"][0]["results"]["1step"].update(nfe="<img>"), "has no integer nfe"),
        (lambda d: d["history"][0]["results"]["1step"].update(fid="12"), "fid='12', not a finite number"),
        (lambda d: d.update(reference=3), "reference=3 is not a string"),
        (lambda d: d.update(history=[]), "holds no measurement"),
        (lambda d: d.pop("history"), "holds no measurement"),
    ],
)
def test_a_metrics_file_outside_the_schema_stops_the_report_in_one_line(edit, words, tmp_path):
    run = fake_run(tmp_path / "run")
    data = json.loads((run / "metrics.json").read_text())
    edit(data)
    (run / "metrics.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="is not a metrics file") as info:
        write_report([run], tmp_path / "out")
    assert words in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out" / "report.html").exists()


@pytest.mark.parametrize("content", ['{"history": [', "[1, 2]", "\xff\xfe"])
def test_invalid_json_or_a_list_stops_the_report_in_one_line(content, tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "metrics.json").write_text(content, encoding="latin-1")
    with pytest.raises(ConfigError, match="is not a metrics file"):
        write_report([run], tmp_path / "out")


@pytest.mark.parametrize("content", ["!!python/object/apply:os.system ['true']", "[unclosed", "{a: 1}"])
def test_a_malformed_or_tagged_overrides_file_stops_the_report_in_one_line(content, tmp_path):
    run = fake_run(tmp_path / "run")
    (run / ".hydra").mkdir()
    (run / ".hydra/overrides.yaml").write_text(content)
    with pytest.raises(ConfigError, match="overrides"):
        write_report([run], tmp_path / "out")


def test_a_damaged_metrics_file_is_set_aside_on_resume(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"reference": "digits", "history": [{"step": 2, "res')  # cut short mid-write
    assert earlier_history(path) == []
    assert not path.exists() and (tmp_path / "metrics.json.damaged").read_text().endswith('"res')
    path.write_text(json.dumps({"history": [{"step": 2, "results": {}}]}))
    assert earlier_history(path) == [{"step": 2, "results": {}}]


def test_an_atomic_write_leaves_the_old_file_when_it_fails(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic.replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    atomic.write_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, where root may mount one; skipped elsewhere."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if (
        shutil.which("mount") is None
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_stops_in_one_line_and_leaves_no_partial_file(small_disk):
    path = small_disk / "metrics.json"
    path.write_text("old")
    with pytest.raises(ConfigError, match="the disk is full") as info:
        atomic.write_bytes(path, b"x" * 2**21)
    assert "\n" not in str(info.value)
    assert path.read_text() == "old" and [p.name for p in small_disk.iterdir()] == ["metrics.json"]


# --- overwrite removes exactly one run's outputs ---------------------------------------------------------
def tree_hashes(folder) -> dict:
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_into_its_teachers_directory_is_refused_even_with_overwrite(edm_run):
    from helpers import TINY
    from helpers.launch import train_here

    before = tree_hashes(edm_run)
    teacher = edm_run / "checkpoints/last.ckpt"
    with pytest.raises(ConfigError, match="holds this command's input model.teacher_ckpt=") as info:
        train_here(
            ["experiment=digits_cd", f"model.teacher_ckpt={teacher}", *TINY, "ckpt_path=null"]
            + ["overwrite=true", "logger=none"],
            edm_run,
        )
    assert "\n" not in str(info.value) and tree_hashes(edm_run) == before


def test_overwrite_removes_the_previous_runs_history_grids_and_wandb_id(edm_run, tmp_path):
    from helpers import TINY
    from helpers.launch import train_here

    run = tmp_path / "run"
    shutil.copytree(edm_run, run)
    (run / "wandb_run_id").write_text("oldrun\n")
    (run / "metrics.json").write_text(json.dumps({"history": [{"step": 99, "results": {}}]}))
    (run / "samples").mkdir(exist_ok=True)
    (run / "samples/old_1step.png").write_bytes(b"old")
    train_here([*TINY, "ckpt_path=null", "overwrite=true", "logger=none"], run)
    assert not (run / "samples/old_1step.png").exists()
    assert not (run / "wandb_run_id").exists()  # logger=none: the old id gone, no new one written
    history = json.loads((run / "metrics.json").read_text())["history"] if (run / "metrics.json").exists() else []
    assert all(h["step"] != 99 for h in history)


def test_an_evaluation_never_writes_into_a_training_run(cd_run, tmp_path):
    from helpers.launch import evaluate_here

    before = tree_hashes(cd_run)
    for overwrite in ("false", "true"):
        with pytest.raises(ConfigError, match="is a training run's directory"):
            evaluate_here([f"ckpt={cd_run / 'checkpoints/last.ckpt'}", "num=4", f"overwrite={overwrite}"], cd_run)
    assert tree_hashes(cd_run) == before


# --- files that are not what they claim -------------------------------------------------------------------
def test_a_truncated_image_is_skipped_before_training_naming_it(tmp_path, caplog):
    from PIL import Image

    from cm_lightning.data.image_folder import ImageFolderDataModule

    for i in range(3):
        Image.effect_noise((64, 64), 50 + i).convert("RGB").save(tmp_path / f"{i}.png")
    whole = (tmp_path / "2.png").read_bytes()
    (tmp_path / "2.png").write_bytes(whole[: len(whole) * 3 // 4])  # cut short: its header still reads
    data = ImageFolderDataModule(root=str(tmp_path), image_size=8, batch_size=2)
    assert [f.name for f in data.files] == ["0.png", "1.png"]
    assert "2.png" in caplog.text and "do not decode" in caplog.text


@pytest.mark.parametrize("kind", ["dangling", "looping"])
def test_a_broken_checkpoint_symlink_is_skipped_by_auto_resume(kind, tmp_path, caplog):
    from cm_lightning.callbacks.checkpoint import newest_first

    (tmp_path / "good.ckpt").write_bytes(b"x")
    if kind == "dangling":
        (tmp_path / "last.ckpt").symlink_to(tmp_path / "gone.ckpt")
    else:
        (tmp_path / "a.ckpt").symlink_to(tmp_path / "b.ckpt")
        (tmp_path / "b.ckpt").symlink_to(tmp_path / "a.ckpt")
    assert newest_first(tmp_path) == [tmp_path / "good.ckpt"]
    assert "cannot be opened" in caplog.text


def test_a_reference_with_an_object_array_is_never_unpickled(tmp_path):
    import numpy as np

    from cm_lightning.metrics.reference import read_npz_images

    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ConfigError, match="object \\(pickled\\) array") as info:
        read_npz_images(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_write_into_a_directory_or_under_a_file_stops_in_one_line(tmp_path):
    from cm_lightning.runtime.run_dir import refuse_existing

    (tmp_path / "folder").mkdir()
    (tmp_path / "folder/keep.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="export_to=.* is an existing directory"):
            refuse_existing(tmp_path / "folder", "export_to", overwrite, "choose another export_to=...")
    (tmp_path / "file").write_text("data")
    for target in (tmp_path / "folder", tmp_path / "file/sub/out.json"):
        with pytest.raises(ConfigError) as info:
            atomic.write_text(target, "new")
        assert "\n" not in str(info.value) and str(target) in str(info.value)
    assert (tmp_path / "folder/keep.txt").read_text() == "keep" and (tmp_path / "file").read_text() == "data"


@pytest.mark.parametrize("under", [False, True])
def test_a_run_directory_on_or_under_a_file_stops_in_one_line_before_hydra(under, tmp_path):
    from helpers.launch import run_script

    file = tmp_path / "a_file"
    file.write_text("mine")
    target = file / "run" if under else file
    proc = run_script("evaluate.py", "ckpt=x.ckpt", f"hydra.run.dir={target}", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and f"hydra.run.dir={target}" in lines[0] and f"the file {file}" in lines[0]
    assert file.read_text() == "mine"
