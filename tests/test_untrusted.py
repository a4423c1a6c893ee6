"""A checkpoint a user downloads never runs code: on every path that loads a file (evaluate.py's tasks, the
teacher, ``ckpt_path=``, auto-resume, export, the feature-extractor weights) a pickle payload and a stored
config naming a function to call are refused with one line, and the marker file either would create stays
absent. Our own checkpoints and the authors' plain state dicts still load."""

import copy
import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY
from helpers.builders import randomise, tiny_net
from helpers.launch import evaluate_here, run_script, train_here
from hydra.errors import InstantiationException

from cm_lightning.cli import _root_cause
from cm_lightning.errors import ConfigError
from cm_lightning.loading import sampler_from_checkpoint
from cm_lightning.metrics.fidelity import Fidelity
from cm_lightning.untrusted import instantiate_trusted, load_file, refused_target, weights_stream

TASKS = [
    "sample",
    "export",
    "fid",
    "search_midpoint",
    "inpaint",
    "colorize",
    "superres",
    "stroke",
    "denoise",
    "interpolate",
]


def task_options(task: str, inputs: Path) -> list[str]:
    """``task=<task>`` and the options it reads that these tests set: input= of the editing tasks, num=."""
    editing = ["input=" + str(inputs)] if task in TASKS[4:] else []
    return [f"task={task}", *editing, *(["num=10"] if task != "export" else [])]


class Payload:
    """What an attacker pickles: unpickling it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "the file's code ran"


def pickle_payload(tmp_path, marker) -> Path:
    """A Lightning-shaped checkpoint with a payload inside its state dict."""
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": Payload(marker)}, "global_step": 1, "cm_lightning": {}}, path)
    return path


def gadgets(marker: Path) -> dict:
    """Configs made only of strings, numbers, bytes and dicts, which ``weights_only=True`` loads, each naming
    code for Hydra to call: directly, nested inside an allowed class (``torch.load`` of an in-memory pickle
    with weights_only false: what passes Hydra's own block list), through a module attribute of this package,
    and one of this package's functions."""
    nested_load = {
        "_target_": "torch.load",
        "weights_only": False,
        "f": {"_target_": "io.BytesIO", "initial_bytes": pickle.dumps(Payload(marker))},
    }
    return {
        "os.system": {"_target_": "os.system", "command": f"touch {marker}"},
        "nested torch.load": {"_target_": "cm_lightning.nets.adm.ADMUNet", "image_size": nested_load},
        "attribute path": {**nested_load, "_target_": "cm_lightning.loading.torch.load"},
        "package function": {"_target_": "cm_lightning.tasks.dispatch.evaluate", "cfg": {}},
        "in a list": {"_target_": "cm_lightning.nets.adm.ADMUNet", "channel_mult": [1, nested_load]},
    }


def with_gadget(real: Path, dest: Path, where: str, gadget: dict) -> Path:
    """Our own checkpoint with the gadget put into its stored config at ``where`` (net, data or curriculum)."""
    ckpt = torch.load(real, map_location="cpu", weights_only=True)
    config = copy.deepcopy(ckpt["cm_lightning"]["config"])
    parent = {
        "net": lambda: config["model"],
        "data": lambda: config,
        "curriculum": lambda: config["model"]["objective"]["pair"],
    }
    parent[where]()[where] = gadget
    ckpt["cm_lightning"]["config"] = config
    torch.save(ckpt, dest)
    return dest


def refuses(fn, *words):
    """``fn`` stops with a ConfigError (as the entry points print it: Hydra's wrapper removed), one line
    containing ``words``."""
    with pytest.raises((ConfigError, InstantiationException)) as info:
        fn()
    cause = _root_cause(info.value)
    assert isinstance(cause, ConfigError), repr(cause)
    message = str(cause)
    assert "\n" not in message and all(w in message for w in words), message
    return message


# --- the allow-list ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target",
    [
        "torch.load",
        "os.system",
        "builtins.eval",
        "builtins.exec",
        "subprocess.run",
        "hydra.utils.instantiate",
        "hydra.utils.call",
        "functools.partial",
        "cm_lightning.loading.torch.load",
        "cm_lightning.untrusted.instantiate",
        "cm_lightning.tasks.dispatch.evaluate",
        "cm_lightning.training.train",
        "cm_lightning.nets.adm.nn.Module",
        "cm_lightning.nope.Class",
        "torch.optim.LBFGS",
        None,
        3,
    ],
)
def test_targets_outside_the_allow_list_are_refused(target):
    assert refused_target(target)


@pytest.mark.parametrize(
    "target",
    [
        "cm_lightning.nets.adm.ADMUNet",
        "cm_lightning.data.digits.DigitsDataModule",
        "cm_lightning.diffusion.curricula.ECTCurriculum",
        "cm_lightning.diffusion.karras.ECTSchedule",  # renamed since: stored configs still name it
        "cm_lightning.diffusion.precond.TrigFlow",  # moved to diffusion/trigflow.py
        "cm_lightning.diffusion.precond.MeanFlowParam",  # moved to diffusion/meanflow_param.py
        "torch.optim.RAdam",
        "torch.optim.Adam",
        "torch.optim.AdamW",
        "torch.optim.SGD",
    ],
)
def test_the_package_classes_and_optimisers_are_allowed(target):
    assert not refused_target(target)


@pytest.mark.parametrize("name", list(gadgets(Path("x"))))
def test_every_gadget_is_refused_naming_key_and_target(name, marker):
    message = refuses(
        lambda: instantiate_trusted(gadgets(marker)[name], "the checkpoint's model.net"),
        "the checkpoint's model.net",
        "_target_=",
        "is refused",
    )
    assert name.split()[0] in message or "torch.load" in message or "evaluate" in message


# --- every loading path, a pickle payload ---------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_evaluate_refuses_a_pickle_payload_in_every_task(task, tmp_path, marker):
    evil = pickle_payload(tmp_path, marker)
    refuses(
        lambda: evaluate_here([f"ckpt={evil}", *task_options(task, tmp_path)], tmp_path / "out"),
        f"ckpt={evil}",
        "posix.system",
        "could run code",
    )


def test_teacher_refuses_a_pickle_payload(tmp_path, marker):
    evil = pickle_payload(tmp_path, marker)
    refuses(
        lambda: train_here(
            ["experiment=digits_cd", f"model.teacher_ckpt={evil}", *TINY, "logger=none"], tmp_path / "run"
        ),
        f"model.teacher_ckpt={evil}",
        "could run code",
    )


def test_ckpt_path_refuses_a_pickle_payload(tmp_path, marker):
    evil = pickle_payload(tmp_path, marker)
    refuses(
        lambda: train_here([*TINY, "logger=none", f"ckpt_path={evil}"], tmp_path / "run"),
        f"ckpt_path={evil}",
        "could run code",
    )


def test_auto_resume_refuses_a_pickle_payload_in_the_run_directory(tmp_path, marker):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(pickle_payload(tmp_path, marker), tmp_path / "run" / "checkpoints" / "last.ckpt")
    refuses(lambda: train_here([*TINY, "logger=none"], tmp_path / "run"), "last.ckpt", "could run code")


@pytest.mark.parametrize("extractor", ["digits-classifier", "inception-v3-compat"])
def test_feature_extractor_weights_refuse_a_pickle_payload(extractor, tmp_path, marker):
    evil = tmp_path / "weights.pt"
    torch.save({"w": Payload(marker)}, evil)
    refuses(lambda: Fidelity(extractor, evil), f"feature_extractor_weights_path={evil}", "could run code")


def test_the_command_line_prints_one_line_and_exits_2(tmp_path, marker):
    evil = pickle_payload(tmp_path, marker)
    proc = run_script("evaluate.py", f"ckpt={evil}", f"hydra.run.dir={tmp_path / 'out'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"ckpt={evil}" in lines[0], proc.stderr[-3000:]


# --- every loading path, a stored-config gadget -----------------------------------------------------
def gadget_cases():
    """Every gadget form through task=sample, and the nested torch.load form through every task."""
    return [("sample", name) for name in gadgets(Path("x"))] + [(task, "nested torch.load") for task in TASKS[1:]]


@pytest.mark.parametrize("task,name", gadget_cases())
def test_evaluate_refuses_a_gadget_in_the_stored_net(task, name, cd_run, tmp_path, marker):
    evil = with_gadget(cd_run / "checkpoints/last.ckpt", tmp_path / "evil.ckpt", "net", gadgets(marker)[name])

    def run():
        return evaluate_here([f"ckpt={evil}", *task_options(task, tmp_path)], tmp_path / "out")

    # Export copies tensors and never builds the network, yet a file naming code is refused as it is read.
    refuses(run, "the checkpoint's model.net", "is refused")


@pytest.mark.parametrize("how", ["ckpt_path", "auto"])
def test_resume_refuses_a_gadget_in_the_stored_config(how, cd_run, edm_run, tmp_path, marker):
    """Lightning never instantiates the stored config; the resume check reads it as data and stops at the
    foreign target before comparing it with the run's own."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    evil = with_gadget(
        cd_run / "checkpoints/last.ckpt", run_dir / "checkpoints/last.ckpt", "net", gadgets(marker)["os.system"]
    )
    overrides = [f"ckpt_path={evil}"] if how == "ckpt_path" else []
    cd = ["experiment=digits_cd", f"model.teacher_ckpt={edm_run / 'checkpoints/last.ckpt'}"]
    refuses(
        lambda: train_here([*cd, *TINY, "logger=none", *overrides], run_dir),
        f"ckpt_path={evil}",
        "model.net._target_=os.system is refused",
    )


def test_feature_extractor_weights_refuse_plain_data(tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save({"_target_": "os.system", "command": "true"}, weights)
    refuses(lambda: Fidelity("digits-classifier", weights), "is not a state dict of tensors")


def test_fid_refuses_a_gadget_in_the_stored_data(cd_run, tmp_path, marker):
    evil = with_gadget(
        cd_run / "checkpoints/last.ckpt", tmp_path / "evil.ckpt", "data", gadgets(marker)["nested torch.load"]
    )
    refuses(
        lambda: evaluate_here([f"ckpt={evil}", "task=fid", "num=10"], tmp_path / "out"),
        "the checkpoint's data.image_size._target_=torch.load",
        "is refused",
    )


def test_editing_refuses_a_gadget_in_the_stored_curriculum(cd_run, tmp_path, marker):
    from cm_lightning.loading import read_checkpoint
    from cm_lightning.tasks.editing import run_method

    evil = with_gadget(
        cd_run / "checkpoints/last.ckpt", tmp_path / "evil.ckpt", "curriculum", gadgets(marker)["os.system"]
    )
    refuses(
        lambda: run_method(read_checkpoint(evil)), "the checkpoint's model.objective.pair.curriculum._target_=os.system"
    )


def test_teacher_refuses_a_gadget_in_the_stored_net(edm_run, tmp_path, marker):
    evil = with_gadget(
        edm_run / "checkpoints/last.ckpt", tmp_path / "evil.ckpt", "net", gadgets(marker)["nested torch.load"]
    )
    refuses(
        lambda: train_here(
            ["experiment=digits_cd", f"model.teacher_ckpt={evil}", *TINY, "logger=none"], tmp_path / "run"
        ),
        "the checkpoint's model.net",
        "torch.load",
    )


# --- what must still load ---------------------------------------------------------------------------
def test_our_checkpoints_load_with_weights_only(cd_run, edm_run):
    for run in (cd_run, edm_run):
        sampler = sampler_from_checkpoint(run / "checkpoints/last.ckpt")
        assert sampler.net is not None


@pytest.mark.parametrize("zipped", [True, False])
def test_the_authors_plain_state_dicts_load(zipped, tmp_path):
    state = randomise(tiny_net()).state_dict()
    path = tmp_path / "cd_tiny.pt"
    torch.save(state, path, _use_new_zipfile_serialization=zipped)
    loaded = load_file(path, "ckpt")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    stream = weights_stream(path, "feature_extractor_weights_path")
    assert isinstance(stream, io.BytesIO) and torch.load(stream, weights_only=True).keys() == state.keys()


@pytest.mark.parametrize(
    "content,words",
    [
        (b"", "is empty"),
        (b"hello\n", "is not a PyTorch checkpoint"),
        (b"PK\x03\x04broken", "is not a PyTorch checkpoint"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_names_itself(content, words, tmp_path):
    path = tmp_path / "file.ckpt"
    path.write_bytes(content)
    refuses(lambda: load_file(path, "ckpt"), f"ckpt={path}", words)


# --- interpolations and Hydra keys in a stored config ---------------------------------------------------
def interpolations(marker: Path) -> dict:
    """Strings that OmegaConf would resolve when Hydra instantiates: a node built by ``oc.create`` whose target
    (``builtins.open``, which Hydra's block list lets through) creates ``marker``, the environment, Hydra's
    own config."""
    return {
        "oc.create": "${oc.create:{_target_: builtins.open, _args_: ['" + str(marker) + "', w]}}",
        "oc.env": "${oc.env:HOME}",
        "hydra": "${hydra:runtime.cwd}",
    }


def runs_code(marker: Path) -> str:
    return interpolations(marker)["oc.create"]


def with_value(real: Path, dest: Path, edit) -> Path:
    """Our own checkpoint, read as data, changed by ``edit(ckpt)`` and saved at ``dest``."""
    ckpt = torch.load(real, map_location="cpu", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, dest)
    return dest


PLACES = {  # where in a stored config a gadget goes: (the dict, the key)
    "net": lambda c: (c["model"]["net"], "dropout"),
    "data": lambda c: (c["data"], "image_size"),
    "curriculum": lambda c: (c["model"]["objective"]["pair"]["curriculum"], "mu"),
}


def gadget_at(real: Path, dest: Path, place: str, value) -> Path:
    def edit(ckpt):
        parent, key = PLACES[place](ckpt["cm_lightning"]["config"])
        parent[key] = value

    return with_value(real, dest, edit)


def test_the_interpolation_gadget_runs_under_plain_hydra(tmp_path):
    """What the refusal guards against: the same string in a config Hydra instantiates creates the marker."""
    from hydra.utils import instantiate

    marker = tmp_path / "RAN"
    instantiate({"_target_": "builtins.dict", "x": runs_code(marker)})
    assert marker.exists()


@pytest.mark.parametrize("place", list(PLACES))
@pytest.mark.parametrize("name", list(interpolations(Path("x"))))
def test_an_interpolation_in_the_stored_config_is_refused(place, name, cd_run, tmp_path, marker):
    evil = gadget_at(cd_run / "checkpoints/last.ckpt", tmp_path / "evil.ckpt", place, interpolations(marker)[name])
    key = {"net": "model.net.dropout", "data": "data.image_size", "curriculum": "pair.curriculum.mu"}[place]
    refuses(lambda: sampler_from_checkpoint(evil), f"ckpt={evil}", key, "is an interpolation")


@pytest.mark.parametrize("task", ["sample", "fid", "inpaint", "export"])
def test_evaluate_refuses_an_interpolation_in_every_kind_of_task(task, cd_run, tmp_path, marker):
    place = {"fid": "data", "inpaint": "curriculum"}.get(task, "net")
    evil = gadget_at(cd_run / "checkpoints/last.ckpt", tmp_path / "evil.ckpt", place, runs_code(marker))
    refuses(
        lambda: evaluate_here([f"ckpt={evil}", *task_options(task, tmp_path)], tmp_path / "out"), "is an interpolation"
    )


def test_teacher_refuses_an_interpolation(edm_run, tmp_path, marker):
    evil = gadget_at(edm_run / "checkpoints/last.ckpt", tmp_path / "evil.ckpt", "net", runs_code(marker))
    for init in ("false", "true"):
        refuses(
            lambda init=init: train_here(
                ["experiment=digits_cd", f"model.teacher_ckpt={evil}", f"model.init_from_teacher={init}", *TINY]
                + ["logger=none"],
                tmp_path / "run",
            ),
            f"model.teacher_ckpt={evil}",
            "is an interpolation",
        )


@pytest.mark.parametrize("how", ["ckpt_path", "auto"])
def test_resume_refuses_an_interpolation(how, cd_run, edm_run, tmp_path, marker):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    evil = gadget_at(cd_run / "checkpoints/last.ckpt", run_dir / "checkpoints/last.ckpt", "data", runs_code(marker))
    overrides = [f"ckpt_path={evil}"] if how == "ckpt_path" else []
    cd = ["experiment=digits_cd", f"model.teacher_ckpt={edm_run / 'checkpoints/last.ckpt'}"]
    refuses(lambda: train_here([*cd, *TINY, "logger=none", *overrides], run_dir), "is an interpolation")


def test_the_command_line_refuses_an_interpolation_in_one_line(cd_run, tmp_path, marker):
    evil = gadget_at(cd_run / "checkpoints/last.ckpt", tmp_path / "evil.ckpt", "net", runs_code(marker))
    proc = run_script("evaluate.py", f"ckpt={evil}", "num=4", f"hydra.run.dir={tmp_path / 'out'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "model.net.dropout" in lines[0] and "interpolation" in lines[0], proc.stderr[-3000:]


@pytest.mark.parametrize(
    "place,key,value",
    [
        ("net", "_partial_", True),
        ("net", "_convert_", "all"),
        ("data", "_args_", [1]),
        ("curriculum", "_recursive_", False),
        ("net", "${oc.env:HOME}", 1),
    ],
)
def test_hydra_keys_outside_the_optimiser_are_refused(place, key, value, cd_run, tmp_path):
    def edit(ckpt):
        PLACES[place](ckpt["cm_lightning"]["config"])[0][key] = value

    evil = with_value(cd_run / "checkpoints/last.ckpt", tmp_path / "evil.ckpt", edit)
    refuses(lambda: sampler_from_checkpoint(evil), f"ckpt={evil}", key, "is refused")


def test_the_optimiser_keeps_its_hydra_keys(cd_run):
    stored = load_file(cd_run / "checkpoints/last.ckpt", "ckpt")["cm_lightning"]["config"]["model"]["optimizer"]
    assert stored["_partial_"] is True and stored["_convert_"] == "all"
    assert sampler_from_checkpoint(cd_run / "checkpoints/last.ckpt").net is not None


def test_a_config_thousands_of_levels_deep_is_refused_without_a_traceback(cd_run, tmp_path):
    import sys

    def edit(ckpt):
        deep = {}
        for _ in range(3000):
            deep = {"x": deep}
        ckpt["cm_lightning"]["config"]["model"]["net"]["extra"] = deep

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # for pickling it here; reading it back must not need this
    try:
        evil = with_value(cd_run / "checkpoints/last.ckpt", tmp_path / "evil.ckpt", edit)
    finally:
        sys.setrecursionlimit(limit)
    refuses(lambda: sampler_from_checkpoint(evil), f"ckpt={evil}", "deeper than 32 levels")


# --- damaged or crafted checkpoint layouts ----------------------------------------------------------------
def _drop_ema_key(ckpt):
    del ckpt["state_dict"][next(k for k in ckpt["state_dict"] if k.startswith("ema.0."))]


def _reshape_ema_key(ckpt):
    key = next(k for k in ckpt["state_dict"] if k.startswith("ema.0.") and ckpt["state_dict"][k].dim() > 1)
    ckpt["state_dict"][key] = ckpt["state_dict"][key].flatten()


DAMAGE = {
    "meta a string": (lambda c: c.update(cm_lightning="x"), "is a str, not a mapping"),
    "config a string": (lambda c: c["cm_lightning"].update(config="x"), "stored config is missing or not a mapping"),
    "state_dict a list": (lambda c: c.update(state_dict=[1, 2]), "state_dict is missing"),
    "no state_dict": (lambda c: c.pop("state_dict"), "state_dict is missing"),
    "no model.net": (lambda c: c["cm_lightning"]["config"]["model"].pop("net"), "model.net is missing"),
    "no parameterisation": (lambda c: c["cm_lightning"].pop("parameterisation"), "parameterisation is missing"),
    "sample_ema out of range": (lambda c: c["cm_lightning"].update(sample_ema=7), "sample_ema (7) is not an index"),
    "sample_ema a string": (lambda c: c["cm_lightning"].update(sample_ema="0"), "sample_ema ('0') is not an index"),
    "ema_rates empty": (lambda c: c["cm_lightning"].update(ema_rates=[]), "ema_rates ([]) are not a list"),
    "EMA key missing": (_drop_ema_key, "the checkpoint's ema.0 weights does not match"),
    "EMA key mis-shaped": (_reshape_ema_key, "the checkpoint's ema.0 weights does not match"),
    "unknown parameterisation field": (
        lambda c: c["cm_lightning"]["parameterisation"].update(extra=1),
        "parameterisation",
    ),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_a_damaged_checkpoint_stops_with_one_line(name, cd_run, tmp_path):
    edit, words = DAMAGE[name]
    evil = with_value(cd_run / "checkpoints/last.ckpt", tmp_path / "bad.ckpt", edit)
    refuses(lambda: sampler_from_checkpoint(evil), words)


def test_a_damaged_checkpoint_stops_the_command_line_in_one_line(cd_run, tmp_path):
    evil = with_value(cd_run / "checkpoints/last.ckpt", tmp_path / "bad.ckpt", DAMAGE["config a string"][0])
    proc = run_script("evaluate.py", f"ckpt={evil}", "num=4", f"hydra.run.dir={tmp_path / 'out'}", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and f"ckpt={evil}" in lines[0], proc.stderr[-3000:]


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_a_path_that_is_not_a_regular_file_says_what_it_is(kind, tmp_path):
    path = {"fifo": tmp_path / "pipe", "directory": tmp_path, "device": Path("/dev/zero")}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    words = "is a directory" if kind == "directory" else "is not a regular file"
    refuses(lambda: sampler_from_checkpoint(path), f"ckpt={path}", words)
    refuses(lambda: load_file(path, "model.teacher_ckpt"), f"model.teacher_ckpt={path}", words)


def test_a_checkpoint_that_inflates_is_refused_before_it_is_read(tmp_path):
    """torch.save stores zip entries uncompressed; a file repacked with deflate can claim gigabytes in bytes."""
    import zipfile

    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2**21)}, plain)  # 8 MiB of zeros
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert bomb.stat().st_size < 2**20
    refuses(lambda: load_file(bomb, "ckpt"), f"ckpt={bomb}", "expands from", "crafted")
    assert torch.equal(load_file(plain, "ckpt")["w"], torch.zeros(2**21))
