"""NVlabs EDM's released network pickles, written for tests in their format: ``torch_utils.persistence`` records
(a reconstructor global and a meta with ``module_src``, ``class_name`` and ``state``) of an ``EDMPrecond`` whose
``model`` is a ``SongUNet`` or ``DhariwalUNet`` with the official keys and shapes
(``tests/data/edm-state-dict-layout.json``, measured on NVlabs' code), random weights, NumPy scalars in the
blocks' state as EDM's ``np.sqrt(0.5)`` skip scale, and a module source that writes a marker file if run."""

import collections
import json
import math
import pickle
import sys
import types

import numpy
import torch

from helpers import TESTS

LAYOUT = json.loads((TESTS / "data" / "edm-state-dict-layout.json").read_text())
BUFFERS = ("freqs", "resample_filter")


def install_persistence(monkeypatch):
    """A stand-in for NVlabs' ``torch_utils.persistence`` as pickles name it, whose reconstructor executes the
    stored module source as the real one does (what a naive ``pickle.load`` would run)."""
    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        exec(meta["module_src"], {})
        return meta["state"]

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)
    return module


def random_state(name: str, seed: int = 0) -> dict:
    """The EDM-keyed state dict of layout ``name`` with random weights of unit-scale outputs, its resampling
    filters as EDM builds them from ``resample_filter``."""
    entry, gen = LAYOUT[name], torch.Generator().manual_seed(seed)
    taps = torch.tensor(entry["kwargs"].get("resample_filter", [1, 1]), dtype=torch.float32)
    out = {}
    for key, shape in entry["state_dict"]:
        if key.endswith("resample_filter"):
            out[key] = (taps.outer(taps) / taps.sum() ** 2).reshape(shape)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            out[key] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    return out


class Persistent:
    """Pickles as NVlabs' persistent classes do: ``_reconstruct_persistent_obj(meta)``."""

    def __init__(self, persistence, class_name: str, state: dict, source: str):
        meta = dict(type="class", version=6, module_src=source, class_name=class_name, state=state)
        self.reduce = (persistence._reconstruct_persistent_obj, (meta,))

    def __reduce__(self):
        return self.reduce


def tree(state: dict) -> dict:
    """``{"a.b.c": t}`` -> ``{"a": {"b": {"c": t}}}``, in the keys' order."""
    root: dict = {}
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return root


def record(persistence, class_name: str, node: dict, source: str, extra: dict | None = None) -> Persistent:
    """A module's persistent record: parameters (as ``nn.Parameter``), buffers and child records."""
    tensors = {k: v for k, v in node.items() if torch.is_tensor(v)}
    children = {k: v for k, v in node.items() if isinstance(v, dict)}
    state = {
        "training": False,
        "_parameters": collections.OrderedDict(
            (k, torch.nn.Parameter(v, requires_grad=False)) for k, v in tensors.items() if k not in BUFFERS
        ),
        "_buffers": collections.OrderedDict((k, v) for k, v in tensors.items() if k in BUFFERS),
        "_non_persistent_buffers_set": set(),
        "_modules": collections.OrderedDict(
            (k, record(persistence, "UNetBlock" if "norm0" in v else "Module", v, source)) for k, v in children.items()
        ),
    }
    if "norm0" in node:  # EDM's blocks keep their skip scale as a NumPy scalar
        state["skip_scale"] = numpy.float64(math.sqrt(0.5))
    return Persistent(persistence, class_name, {**state, **(extra or {})}, source)


def write_edm_pickle(path, persistence, name: str, state: dict, marker, backbone: str | None = None):
    """``state`` (EDM's keys) as the ``ema`` of an EDM pickle of layout ``name``, beside the loss and
    augmentation records and dataset keywords the released files carry; ``backbone`` renames its class."""
    entry, source = LAYOUT[name], f"open({str(marker)!r}, 'w').write('ran')"
    kwargs = entry["kwargs"]
    model = record(persistence, backbone or entry["backbone"], tree(state), source, {"_init_kwargs": dict(kwargs)})
    precond_kwargs = dict(
        img_resolution=kwargs["img_resolution"], img_channels=3, label_dim=kwargs["label_dim"], use_fp16=False,
        sigma_min=0.0, sigma_max=math.inf, sigma_data=0.5, model_type=entry["backbone"],
    )  # fmt: skip
    ema = record(persistence, "EDMPrecond", {}, source, {"_init_kwargs": precond_kwargs})
    ema.reduce[1][0]["state"]["_modules"]["model"] = model
    loss = Persistent(persistence, "EDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}, source)
    augment = Persistent(persistence, "AugmentPipe", {"p": 0.12, "xflip": 1e8}, source)
    data = {"ema": ema, "loss_fn": loss, "augment_pipe": augment, "dataset_kwargs": {"use_labels": False}}
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path
