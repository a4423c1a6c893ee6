"""The inner layout of a cm-lightning checkpoint, known here and nowhere else.

Lightning writes the file. Its state dict holds the raw student under ``net.`` and the EMAs under
``ema.<i>.`` (``weights``). Under ``META_KEY`` this project adds what the file alone must give back
(``metadata``): the resolved run config, the parameterisation by name with its fields, the EMA rates (and
power-EMA stds) with the index of the one that samples, and the method's facts that editing needs, asked of
the objective when the file is written (``Objective.method_facts``) rather than guessed from class names
later. ``opened`` checks all of it once as a file is read (``check_layout``), and ``upgrade`` turns the layouts
that earlier versions wrote into today's, so that no other module knows them.
"""

import torch

from cm_lightning.diffusion.meanflow_param import MeanFlowParam
from cm_lightning.diffusion.precond import Precond
from cm_lightning.diffusion.trigflow import TrigFlow
from cm_lightning.errors import ConfigError
from cm_lightning.untrusted import check_inert, check_targets, current, instantiate_trusted

META_KEY = "cm_lightning"
NET_PREFIX = "net."
# The stored config's parts that evaluate.py may build: every target in them must pass the allow-list.
BUILT = ("model", "data")


def ema_prefix(index: int) -> str:
    return f"ema.{index}."


def metadata(run_config, parameterisation, ema_rates, ema_stds, sample_ema: int, method: dict | None) -> dict:
    """What ``GenerativeModule.on_save_checkpoint`` stores under ``META_KEY``."""
    return {
        "config": run_config,
        "parameterisation": parameterisation.to_meta(),
        "ema_rates": list(ema_rates),
        "ema_stds": list(ema_stds),
        "sample_ema": sample_ema,
        "method": method,
    }


def is_state_dict(state) -> bool:
    return (
        isinstance(state, dict)
        and bool(state)
        and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())
    )


def weights(ckpt: dict, which: str = "ema", index: int | None = None) -> dict:
    """The state dict of one network in ``ckpt``: the EMA ``index`` (default: the one that samples) or, with
    ``which='net'``, the raw student."""
    if which == "net":
        prefix = NET_PREFIX
    else:
        prefix = ema_prefix(ckpt[META_KEY]["sample_ema"] if index is None else index)
    return {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def num_emas(meta: dict) -> int:
    return len(meta.get("ema_rates") or []) + len(meta.get("ema_stds") or [])


def check_layout(ckpt: dict, source: str) -> None:
    """What the package reads from a cm-lightning checkpoint, checked as it is read, so that a damaged or
    crafted file stops with one line naming the entry instead of a traceback deep inside sampling: the
    metadata is a mapping of inert data (``untrusted.check_inert``) whose buildable parts name only allowed
    classes, the state dict maps names to tensors, and the parameterisation and EMA choice are there."""

    def damaged(entry: str, wrong: str):
        return ConfigError(
            f"{source} is damaged or was not written by train.py: {entry} {wrong}; use a checkpoint a training "
            "run wrote (its checkpoints/last.ckpt)"
        )

    meta = ckpt[META_KEY]
    if not isinstance(meta, dict):
        raise damaged(f"its '{META_KEY}' entry", f"is a {type(meta).__name__}, not a mapping")
    if not is_state_dict(ckpt.get("state_dict")):
        raise damaged("its state_dict", "is missing or not a mapping of names to tensors")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise damaged("its stored config", "is missing or not a mapping")
    check_inert(meta, f"{source}: the stored metadata")
    for part in BUILT:
        check_targets(current(config.get(part)), f"{source}: the checkpoint's {part}")
    net = config.get("model", {}).get("net") if isinstance(config.get("model"), dict) else None
    if not isinstance(net, dict) or "_target_" not in net:
        raise damaged("the stored config's model.net", "is missing or names no network class")
    parameterisation = meta.get("parameterisation", meta.get("precond"))  # "precond": the layout before names
    if not isinstance(parameterisation, dict):
        raise damaged("its parameterisation", "is missing or not a mapping")
    for key in ("ema_rates", "ema_stds"):
        rates = meta.get(key, [])
        if not isinstance(rates, list) or not all(isinstance(r, int | float) for r in rates):
            raise damaged(f"its {key}", f"({rates!r}) are not a list of numbers")
    if not num_emas(meta):
        raise damaged("its ema_rates", f"({meta.get('ema_rates')!r}) are not a list of numbers")
    index = meta.get("sample_ema")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_emas(meta):
        raise damaged("its sample_ema", f"({index!r}) is not an index into its {num_emas(meta)} EMA(s)")
    method = meta.get("method")
    if method is not None and not (
        isinstance(method, dict)
        and method.get("family") in ("cd", "ct")
        and isinstance(method.get("num_scales"), int)
        and method["num_scales"] >= 0
    ):
        raise damaged("its method", f"({method!r}) is not a method family and grid size")


def opened(ckpt: dict, source: str) -> dict:
    """``ckpt`` as the package reads it: its layout checked (``check_layout``), its metadata in today's layout."""
    check_layout(ckpt, source)
    return {**ckpt, META_KEY: upgrade(ckpt[META_KEY])}


def upgrade(meta: dict) -> dict:
    """``meta`` in today's layout, whichever version wrote it: renamed classes under their current paths;
    ``kind`` + ``precond`` + ``grid`` (before parameterisations had names: always the Karras family) as a
    named parameterisation; the method's facts, for files written before they were stored, from the config."""
    meta = {**meta, "config": current(meta.get("config") or {})}
    if "parameterisation" not in meta and "precond" in meta:
        meta["parameterisation"] = {"name": "karras", **meta.pop("precond"), **meta.pop("grid", {})}
        meta.pop("kind", None)
    if "method" not in meta:
        meta["method"] = legacy_method(meta["config"])
    return meta


def legacy_method(config: dict) -> dict | None:
    """``method_facts`` of a run from its stored config, for files written before the facts were stored: the
    pair rule's family by its class name and the curriculum's N at the run's last step."""
    model = config.get("model") or {}
    key = "target" if "target" in model else "objective.pair"  # the layout before and since objectives
    pair = model["target"] if "target" in model else (model.get("objective") or {}).get("pair")
    if not isinstance(pair, dict):
        return None
    stored = "curriculum" if "curriculum" in pair else "schedule"  # its name before the curriculum was one
    curriculum = None
    if stored in pair:
        curriculum = instantiate_trusted(pair[stored], f"the checkpoint's model.{key}.{stored}")
    max_steps = (config.get("trainer") or {}).get("max_steps")
    final = curriculum(max_steps) if callable(curriculum) and isinstance(max_steps, int) else None
    family = "cd" if str(pair.get("_target_")).endswith(".CDPairRule") else "ct"
    return {"family": family, "num_scales": int(final[0]) if isinstance(final, tuple) else 0}


PARAMETERISATIONS = {cls.name: cls for cls in (Precond, TrigFlow, MeanFlowParam)}


def from_meta(meta: dict):
    """The parameterisation a checkpoint's metadata (in today's layout, ``checkpoint.upgrade``) names, with its
    stored fields."""
    fields = dict(meta["parameterisation"])
    name = fields.pop("name", None)
    if name not in PARAMETERISATIONS:
        raise ConfigError(f"the checkpoint's parameterisation {name!r} is unknown; known: {sorted(PARAMETERISATIONS)}")
    return PARAMETERISATIONS[name](**fields)
