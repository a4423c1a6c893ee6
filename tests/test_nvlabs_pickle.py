"""NVlabs' released networks are pickles whose persistent objects carry their class's source code, which
``torch_utils.persistence`` executes on load. Built here in that format (a reconstructor global and a meta with
``module_src``, ``class_name`` and ``state``), they load as data: the tensors arrive, the source never runs."""

import collections
import copy
import os
import pickle

import numpy
import pytest
import torch
from helpers import TINY
from helpers.builders import randomise, tiny_net
from helpers.edm_pickles import Persistent, install_persistence
from helpers.launch import train_here

from cm_lightning.diffusion.precond import edm_denoiser
from cm_lightning.errors import ConfigError
from cm_lightning.loading import load_teacher, sampler_from_checkpoint
from cm_lightning.nvlabs_pickle import read_pickle
from cm_lightning.sampler import Sampler


@pytest.fixture
def persistence(monkeypatch):
    return install_persistence(monkeypatch)


def as_record(persistence, module: torch.nn.Module, source: str, class_name=None):
    """``module`` and its submodules as persistent objects holding their parameters and buffers."""
    state = {
        "training": False,
        "_parameters": collections.OrderedDict((k, v) for k, v in module._parameters.items() if v is not None),
        "_buffers": collections.OrderedDict((k, v) for k, v in module._buffers.items() if v is not None),
        "_non_persistent_buffers_set": set(),
        "_modules": collections.OrderedDict(
            (k, as_record(persistence, m, source)) for k, m in module._modules.items() if m is not None
        ),
    }
    return Persistent(persistence, class_name or type(module).__name__, state, source)


def write_pickle(path, persistence, net, marker, precond="EDMPrecond", backbone="model", sigma_data=0.5):
    source = f"open({str(marker)!r}, 'w').write('ran')"
    ema = as_record(persistence, torch.nn.Module(), source, precond)
    ema.reduce[1][0]["state"]["_modules"][backbone] = as_record(persistence, net, source)
    ema.reduce[1][0]["state"]["_init_kwargs"] = {"img_resolution": 8, "sigma_data": sigma_data}
    encoder = {"scale": numpy.full(4, 0.5, dtype=numpy.float32), "bias": numpy.zeros(4, dtype=numpy.float32)}
    with open(path, "wb") as f:  # EDM2's files also carry their VAE encoder's NumPy arrays
        pickle.dump({"ema": ema, "loss_fn": None, "augment_pipe": None, "encoder": encoder}, f)
    return path


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "the pickle's module source ran"


def test_the_format_runs_its_source_when_unpickled_naively(persistence, tmp_path):
    marker = tmp_path / "RAN"
    path = write_pickle(tmp_path / "edm.pkl", persistence, randomise(tiny_net()), marker)
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize("backbone,precond", [("model", "EDMPrecond"), ("unet", "Precond")])
def test_the_tensors_load_and_the_source_never_runs(backbone, precond, persistence, tmp_path, marker):
    net = randomise(tiny_net())
    path = write_pickle(tmp_path / "net.pkl", persistence, net, marker, precond, backbone)
    found = read_pickle(path)
    assert found["class_name"] == precond and found["kwargs"]["sigma_data"] == 0.5
    assert found["state_dict"].keys() == net.state_dict().keys()
    assert all(torch.equal(found["state_dict"][k], v) for k, v in net.state_dict().items())


def test_evaluate_and_the_teacher_read_the_pickle_as_an_edm_denoiser(persistence, tmp_path, marker):
    net = randomise(tiny_net())
    path = write_pickle(tmp_path / "edm-tiny.pkl", persistence, net, marker)
    direct = Sampler(copy.deepcopy(net).eval(), edm_denoiser(noise_kind=net.noise_kind))
    sampler = sampler_from_checkpoint(path, net=tiny_net())
    assert torch.equal(sampler(2, steps=3, seed=0)[0], direct(2, steps=3, seed=0)[0])
    teacher = load_teacher(path, like=tiny_net())
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0])
    assert torch.equal(teacher(x, sigma), direct.parameterisation(direct.net, x, sigma))


def test_cd_distils_a_teacher_pickle_from_the_command_line(persistence, edm_run, tmp_path, marker):
    """The digits teacher's EMA weights, written as an NVlabs pickle, teach a CD run through train.py."""
    from cm_lightning.loading import network_from_checkpoint, read_checkpoint

    teacher = network_from_checkpoint(read_checkpoint(edm_run / "checkpoints/last.ckpt"))
    path = write_pickle(tmp_path / "edm-digits.pkl", persistence, teacher, marker)
    run = train_here(["experiment=digits_cd", f"model.teacher_ckpt={path}", *TINY, "logger=none"], tmp_path / "run")
    assert (run / "checkpoints/last.ckpt").is_file()


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("global_", ["os.system", "builtins.eval", "torch.load"])
def test_any_other_global_stops_in_one_line_before_it_is_created(global_, persistence, tmp_path, marker):
    path = tmp_path / "evil.pkl"
    evil = {"os.system": Payload(marker), "builtins.eval": _Reduce(eval, "1"), "torch.load": _Reduce(torch.load, "x")}
    with open(path, "wb") as f:
        pickle.dump({"ema": evil[global_]}, f)
    name = {"os.system": "system", "builtins.eval": "builtins.eval", "torch.load": "torch"}[global_]
    with pytest.raises(ConfigError, match=f"holds the global .*{name}") as info:
        read_pickle(path)
    assert "\n" not in str(info.value)


class _Reduce:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def test_another_preconditioning_or_a_foreign_file_stops_in_one_line(persistence, tmp_path, marker):
    path = write_pickle(tmp_path / "vp.pkl", persistence, randomise(tiny_net()), marker, "VPPrecond")
    with pytest.raises(ConfigError, match="holds a VPPrecond; only EDM's EDMPrecond"):
        sampler_from_checkpoint(path, net=tiny_net())
    path = write_pickle(tmp_path / "sd.pkl", persistence, randomise(tiny_net()), marker, sigma_data=1.0)
    with pytest.raises(ConfigError, match="sigma_data=1.0"):
        load_teacher(path, like=tiny_net())
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="is not a readable NVlabs network pickle"):
        read_pickle(tmp_path / "junk.pkl")
    with open(tmp_path / "other.pkl", "wb") as f:
        pickle.dump({"G_ema": 1}, f)
    with pytest.raises(ConfigError, match="holds no persistent network under 'ema'"):
        read_pickle(tmp_path / "other.pkl")
