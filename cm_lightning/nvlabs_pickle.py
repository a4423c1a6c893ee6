"""NVlabs' released networks (EDM's ``edm-cifar10-32x32-*.pkl`` ..., EDM2's ``edm2-img512-*.pkl`` ...) read as
data, never as code.

They are plain pickles of objects whose classes ``torch_utils.persistence`` made persistent: each such object
pickles as ``_reconstruct_persistent_obj(meta)``, with ``meta["module_src"]`` the source code of its class,
which the real function ``exec``s. ``NVlabsUnpickler`` never calls it: that global resolves to ``Record``,
which keeps the class name and the stored ``state`` (the module's ``__dict__``: its ``_parameters``,
``_buffers``, ``_modules`` and ``_init_kwargs``). Tensors pickle as ``torch._utils._rebuild_tensor_v2`` of a
storage written with ``torch.save`` (``torch.storage._load_from_bytes``), which is read back here with
``torch.load(weights_only=True)``. The few containers a network's state holds map to plain ones, and every
other global stops the load with one line naming it, before it is created.
"""

import collections
import io
import pickle
from pathlib import Path

import numpy
import torch

from cm_lightning.errors import ConfigError
from cm_lightning.nets.edm_config import EDMState
from cm_lightning.nets.edm_layout import convert

try:  # NumPy 2 moved it; pickles name either path
    from numpy._core.multiarray import _reconstruct
except ImportError:
    from numpy.core.multiarray import _reconstruct

PERSISTENT = ("torch_utils.persistence", "_reconstruct_persistent_obj")


class Record:
    """A persistent object as data: its class name and stored state, its code never run."""

    def __init__(self, meta):
        meta = meta if isinstance(meta, dict) else {}
        self.class_name = str(meta.get("class_name", "?"))
        self.state = meta.get("state") if isinstance(meta.get("state"), dict) else {}


class Plain:
    """A non-persistent ``torch.nn`` container (``ModuleList``, ``ModuleDict``, ...) rebuilt as its state."""

    def __init__(self, *args, **kwargs):
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


def _new_plain(cls, *args):
    return cls()


def _scalar(dtype, data=None):
    """A NumPy scalar from its dtype and raw bytes: EDM's blocks keep ``np.sqrt(0.5)`` and the like in their
    state. A scalar of Python objects is refused: it would carry an arbitrary object."""
    if not isinstance(dtype, numpy.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise ValueError(f"a NumPy scalar of dtype {dtype} is not plain data")
    return numpy.frombuffer(data, dtype=dtype)[0]


def _load_storage(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


CONTAINERS = ("ModuleList", "ModuleDict", "Sequential", "Identity", "ParameterList", "ParameterDict")
ALLOWED = {
    PERSISTENT: Record,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("builtins", "set"): set,
    ("builtins", "object"): object,
    ("dnnlib.util", "EasyDict"): dict,
    ("copyreg", "_reconstructor"): lambda cls, base, state: cls(),
    ("copyreg", "__newobj__"): _new_plain,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    # EDM2's pickles keep their VAE encoder's scale and bias as NumPy arrays: plain arrays from raw bytes
    # (an object array's elements would still pass through find_class).
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): numpy.ndarray,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "dtype"): numpy.dtype,
    ("torch", "float32"): torch.float32,
    ("torch", "float16"): torch.float16,
}


class NVlabsUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in ALLOWED:
            return ALLOWED[module, name]
        if module.startswith("torch.nn.modules.") and name in CONTAINERS:
            return Plain
        raise ConfigError(
            f"{self.path} holds the global {module}.{name}, which an NVlabs network pickle does not need; it is "
            "refused because loading it could run code. Use a released EDM or EDM2 .pkl file"
        )


def flatten(record, prefix: str = "") -> dict:
    """The state dict a persistent module ``record`` would give: its parameters and buffers, then its
    submodules', names joined by dots as ``nn.Module.state_dict`` joins them."""
    state = record.state
    out = {}
    for group in ("_parameters", "_buffers"):
        for key, value in (state.get(group) or {}).items():
            if torch.is_tensor(value):
                out[prefix + key] = value.detach()
    for key, child in (state.get("_modules") or {}).items():
        if isinstance(child, Record | Plain):
            out.update(flatten(child, f"{prefix}{key}."))
    return out


def read_pickle(path) -> dict:
    """The network an NVlabs pickle holds under ``ema`` (EDM, EDM2): ``{"class_name", "state_dict",
    "kwargs", "backbone"}``, the preconditioning's class, the state dict of its backbone (the precond's own
    ``model`` (EDM) or ``unet`` (EDM2) submodule, prefix removed; EDM2's ``logvar_*`` head kept under its names),
    the precond's constructor keywords (``sigma_data``, ``img_resolution``, ...) and the backbone's class name
    and constructor keywords (``SongUNet``, ``{"embedding_type": ...}``), as its record stores them."""
    path = Path(str(path)).expanduser()
    try:
        with open(path, "rb") as f:
            data = NVlabsUnpickler(f, path).load()
    except ConfigError:
        raise
    except Exception as exc:  # a damaged or foreign file: pickle, EOF, attribute errors ...
        raise ConfigError(f"{path} is not a readable NVlabs network pickle ({type(exc).__name__}: {exc})") from None
    ema = data.get("ema") if isinstance(data, dict) else None
    if not isinstance(ema, Record):
        raise ConfigError(f"{path} holds no persistent network under 'ema'; it is not an EDM or EDM2 network pickle")
    state = flatten(ema)
    backbone = next((p for p in ("model.", "unet.") if any(k.startswith(p) for k in state)), None)
    if backbone is None:
        raise ConfigError(f"{path}: the {ema.class_name} it holds has no model or unet backbone to load")
    net = {k[len(backbone) :]: v for k, v in state.items() if k.startswith(backbone)}
    head = {k: v for k, v in state.items() if not k.startswith(backbone)}
    kwargs = ema.state.get("_init_kwargs") or {}
    inner = (ema.state.get("_modules") or {}).get(backbone[:-1])
    inner_kwargs = inner.state.get("_init_kwargs") if isinstance(inner, Record) else None
    backbone = {"class_name": getattr(inner, "class_name", "?"), "kwargs": dict(inner_kwargs or {})}
    return {"class_name": ema.class_name, "state_dict": net, "head": head, "kwargs": dict(kwargs), "backbone": backbone}


# The preconditionings whose backbone is an EDM denoiser's: EDM's EDMPrecond and EDM2's Precond.
DENOISERS = ("EDMPrecond", "Precond")
# EDM's backbones whose layout differs from our nets' (nets/edm_layout.py); EDM2's UNet has the official one.
EDM_BACKBONES = ("SongUNet", "DhariwalUNet")


def denoiser_state_dict(path, what: str) -> dict:
    """The backbone's state dict of an NVlabs EDM or EDM2 denoiser pickle, to load like a plain state dict into
    the network the user names; one line for a pickle of another preconditioning or sigma_data. EDM's SongUNet
    and DhariwalUNet backbones come in our NCSNpp's and ADMUNet's layout, as an ``EDMState`` that also names
    that net's config (``nets/edm_config.py``)."""
    found = read_pickle(path)
    if found["class_name"] not in DENOISERS:
        raise ConfigError(
            f"{what}={path} holds a {found['class_name']}; only EDM's EDMPrecond and EDM2's Precond networks are read"
        )
    sigma_data = found["kwargs"].get("sigma_data", 0.5)
    if sigma_data != 0.5:
        raise ConfigError(f"{what}={path} has sigma_data={sigma_data}; the released networks' 0.5 is read")
    if not found["state_dict"]:
        raise ConfigError(f"{what}={path} holds no tensors")
    backbone = found["backbone"]
    if backbone["class_name"] in EDM_BACKBONES:
        source = f"{what}={path}"
        state = convert(backbone["class_name"], backbone["kwargs"], found["state_dict"], source)
        return EDMState(state, backbone["class_name"], backbone["kwargs"], source)
    return found["state_dict"]
