"""Files a user names (checkpoints, the authors' state dicts, a teacher, feature-extractor weights) are data
from elsewhere: loading one must never run code.

* ``load_file`` reads every such file with ``torch.load(weights_only=True)``: PyTorch's restricted unpickler,
  which builds tensors, numbers, strings, lists and dicts and refuses any other Python object (a pickle
  payload such as ``os.system``) before creating it. A file that is not a PyTorch checkpoint at all stops
  with one line naming it.
* ``instantiate_trusted`` is ``hydra.utils.instantiate`` for the run config a checkpoint carries: that config
  came with the file, so a ``_target_`` in it is code the file's author chose. Every ``_target_``, at any
  depth, must be a class of this package (named by its own module path, so that ``cm_lightning.x.torch.load``
  cannot reach ``torch.load`` through a module attribute) or one of the optimisers the configs use.
  Functions are refused even from this package: ``evaluate`` or ``train`` called with arguments of the
  file's choosing would write wherever it says.
* ``check_inert`` runs first, on the whole stored config: Hydra resolves OmegaConf interpolations before it
  instantiates, and ``${oc.create:...}`` builds a node whose targets no allow-list saw (``${oc.env:...}``
  reads the environment). Configs are stored resolved, so one that train.py wrote has no ``${`` anywhere;
  any string or key holding one is refused, and so is every key Hydra treats specially (``_partial_``,
  ``_args_``, ``_convert_``, ``_recursive_``) except where ``SPECIAL_KEYS`` names it for the dict's target.
  Depth and size are bounded, so a crafted file cannot exhaust the stack or the memory of the checks.
"""

import inspect
import io
import re
import zipfile
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from cm_lightning.errors import ConfigError

PACKAGE = "cm_lightning."
# The optimisers conf/model/ uses, named as the configs name them.
OPTIMISERS = frozenset({"torch.optim.RAdam", "torch.optim.Adam", "torch.optim.AdamW", "torch.optim.SGD"})


# The Hydra keys a stored config may carry, by target: conf/model/_common.yaml's optimiser factory.
SPECIAL_KEYS = {target: frozenset({"_partial_", "_convert_"}) for target in OPTIMISERS}
HYDRA_KEYS = frozenset({"_partial_", "_args_", "_convert_", "_recursive_"})
# A stored run config is a few levels deep and a few hundred entries large; these leave wide margins.
MAX_DEPTH = 32
MAX_ENTRIES = 100_000
# torch.save writes its zip entries uncompressed: entries that inflate past this factor are a crafted file.
MAX_INFLATION = 2


class UnloadableFile(ConfigError):
    """``load_file`` refused a file; ``reason`` says why without the ``what=path`` prefix."""

    def __init__(self, what: str, path, reason: str):
        super().__init__(f"{what}={path} {reason}")
        self.reason = reason


def refusal(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, as a clause: a refused object, or not a checkpoint."""
    text = str(exc)
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL (\S+)|Unsupported (?:operand|class) (\S+)", text)
        name = next((g for g in found.groups() if g), "") if found else ""
        return (
            f"holds a Python object{f' ({name})' if name else ''} besides tensors and plain data; it is "
            "refused because loading it could run code. Use a checkpoint written by train.py or a plain "
            "state dict of tensors"
        )
    first = text.splitlines()[0] if text.strip() else "empty or cut short"
    return f"is not a PyTorch checkpoint file ({type(exc).__name__}: {first})"


def not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file, or None: missing, a directory, or a FIFO, device or socket
    (``/dev/zero`` would be read forever)."""
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return "is a directory; name the checkpoint file inside it (e.g. <run>/checkpoints/last.ckpt)"
    if not path.is_file():
        return "is not a regular file (a FIFO, device or socket); name a checkpoint file"
    if path.stat().st_size == 0:
        return "is not a PyTorch checkpoint file (it is empty)"
    return None


def inflation(path: Path) -> str | None:
    """Why a zip-format file is refused before loading: entries that expand past ``MAX_INFLATION`` times the
    file's size (torch.save stores them uncompressed, so only a crafted file does), or None."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            expanded = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError):
        return None  # torch.load names the damage
    size = path.stat().st_size
    if expanded > MAX_INFLATION * size + 2**20:
        return (
            f"expands from {size} to {expanded} bytes (compressed entries, which torch.save never writes); it is "
            "refused as a crafted file. Use a checkpoint written by train.py or torch.save"
        )
    return None


def load_file(path, what: str, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` on the CPU, or ``UnloadableFile`` in one line. ``mmap`` reads
    only the index and structure of a zip-format file, not its tensors (the readability check of resume)."""
    path = Path(str(path)).expanduser()
    reason = not_a_file(path) or inflation(path)
    if reason:
        raise UnloadableFile(what, path, reason)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises UnpicklingError, EOFError, KeyError, RuntimeError, ... by file
        raise UnloadableFile(what, path, refusal(exc)) from None


def load_weights(path, what: str, mmap: bool = False) -> dict:
    """A state dict of tensors (a network's weights file) by ``load_file``; one line for anything else."""
    state = load_file(path, what, mmap=mmap)
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UnloadableFile(what, path, "is not a state dict of tensors (a weights file)")
    return state


def weights_stream(path, what: str) -> io.BytesIO:
    """A weights file loaded by ``load_weights`` and written again as an in-memory file, for a library that
    unpickles whatever it is given without restriction (torch-fidelity's Inception): what it then
    unpickles is only what ``load_weights`` accepted."""
    stream = io.BytesIO()
    torch.save(load_weights(path, what), stream)
    stream.seek(0)
    return stream


def fit_options(trainer) -> dict:
    """``trainer.fit``'s keyword that makes Lightning read the checkpoint it resumes from with
    ``weights_only=True``, in the Lightning versions that have it (2.6 on)."""
    return {"weights_only": True} if "weights_only" in inspect.signature(trainer.fit).parameters else {}


def refused_target(target) -> bool:
    """True unless ``target`` names an allowed optimiser or a class of this package by its own path."""
    target = MOVED.get(target, target)
    if target in OPTIMISERS:
        return False
    if not isinstance(target, str) or not target.startswith(PACKAGE):
        return True
    from hydra._internal.utils import _locate  # Hydra's own resolution of a _target_, so both agree

    try:
        obj = _locate(target)
    except Exception:  # an ImportError or AttributeError of the file's making: just not allowed
        return True
    return not isinstance(obj, type) or f"{obj.__module__}.{obj.__qualname__}" != target


def check_inert(node, where: str) -> None:
    """A config read from a file must be plain data that Hydra can do nothing with but build the classes
    ``check_targets`` allows: no interpolation (``${``) in any key or string, no Hydra key but those
    ``SPECIAL_KEYS`` allows, at most ``MAX_DEPTH`` levels and ``MAX_ENTRIES`` entries. One line naming the
    key otherwise. Walked with an explicit stack: a crafted file may be thousands of levels deep."""
    stack, entries = [(node, where, 0)], 0
    while stack:
        value, at, depth = stack.pop()
        entries += 1
        if entries > MAX_ENTRIES or depth > MAX_DEPTH:
            limit = f"more than {MAX_ENTRIES} entries" if entries > MAX_ENTRIES else f"deeper than {MAX_DEPTH} levels"
            raise ConfigError(
                f"{at} is {limit}, which no config train.py writes holds; the checkpoint is damaged or crafted, "
                "do not use it"
            )
        if isinstance(value, str):
            if "${" in value:
                raise ConfigError(
                    f"{at}={value[:80]!r} is an interpolation; stored configs are written resolved, so the file was "
                    "altered, and resolving it could run code. The checkpoint is refused: do not use it"
                )
        elif isinstance(value, dict | DictConfig):
            target = MOVED.get(value.get("_target_"), value.get("_target_")) if "_target_" in value else None
            allowed = SPECIAL_KEYS.get(target, frozenset()) if isinstance(target, str) else frozenset()
            for key in value:
                if not isinstance(key, str) or "${" in key or (key in HYDRA_KEYS and key not in allowed):
                    raise ConfigError(
                        f"{at}.{key} is refused: a config stored in a checkpoint holds no interpolation and no "
                        "Hydra key but _target_ (and _partial_, _convert_ in the optimiser). The checkpoint is not one "
                        "train.py wrote; do not use it"
                    )
                stack.append((value[key], f"{at}.{key}", depth + 1))
        elif isinstance(value, list | tuple | ListConfig):
            stack.extend((item, f"{at}[{i}]", depth + 1) for i, item in enumerate(value))


def check_targets(node, where: str) -> None:
    """Every ``_target_`` in ``node``, at any depth, must pass ``refused_target``; one line otherwise."""
    if isinstance(node, (dict, DictConfig)):
        items = node.items()
        target = node.get("_target_")
        if "_target_" in node and refused_target(target):
            raise ConfigError(
                f"{where}._target_={target} is refused: a config stored in a checkpoint may only name classes of "
                f"cm_lightning and the optimisers {sorted(OPTIMISERS)}. The checkpoint is not one train.py wrote; "
                "do not use it"
            )
    elif isinstance(node, (list, tuple, ListConfig)):
        items = enumerate(node)
    else:
        return
    for key, value in items:
        check_targets(value, f"{where}.{key}")


# Classes renamed since a checkpoint may have been written: its stored config names them by the old path.
MOVED = {
    "cm_lightning.diffusion.karras.FixedSchedule": "cm_lightning.diffusion.curricula.FixedCurriculum",
    "cm_lightning.diffusion.karras.CMAdaptiveSchedule": "cm_lightning.diffusion.curricula.CMCurriculum",
    "cm_lightning.diffusion.karras.ICTSchedule": "cm_lightning.diffusion.curricula.ICTCurriculum",
    "cm_lightning.diffusion.karras.ECTSchedule": "cm_lightning.diffusion.curricula.ECTCurriculum",
    "cm_lightning.diffusion.targets.CTTarget": "cm_lightning.diffusion.pair_rules.CTPairRule",
    "cm_lightning.diffusion.targets.CDTarget": "cm_lightning.diffusion.pair_rules.CDPairRule",
    "cm_lightning.diffusion.targets.ICTTarget": "cm_lightning.diffusion.pair_rules.ICTPairRule",
    "cm_lightning.diffusion.targets.ECTTarget": "cm_lightning.diffusion.pair_rules.ECTPairRule",
    "cm_lightning.speed.Speed": "cm_lightning.runtime.speed.Speed",
    "cm_lightning.diffusion.precond.TrigFlow": "cm_lightning.diffusion.trigflow.TrigFlow",
    "cm_lightning.diffusion.precond.MeanFlowParam": "cm_lightning.diffusion.meanflow_param.MeanFlowParam",
}


def current(node):
    """A stored config (or ``_target_`` string) with renamed classes under their current paths."""
    if isinstance(node, str):
        return MOVED.get(node, node)
    if isinstance(node, DictConfig | ListConfig):
        node = OmegaConf.to_container(node)
    if isinstance(node, dict):
        return {k: (current(v) if k == "_target_" or not isinstance(v, str) else v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [current(v) if not isinstance(v, str) else v for v in node]
    return node


def instantiate_trusted(node, where: str, **kwargs):
    """``hydra.utils.instantiate(node)`` for a config read from a file (renamed classes under their current
    paths), after ``check_inert`` and ``check_targets``: with no ``${`` left, Hydra's resolution of
    interpolations has nothing to act on."""
    check_inert(node, where)
    node = current(node)
    check_targets(node, where)
    return instantiate(node, **kwargs)
