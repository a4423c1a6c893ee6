"""A training run's records as ``task=report`` reads them: ``metrics.json`` and Hydra's ``overrides.yaml``.
They may come from anyone's sweep directory, so they are untrusted data: checked against the schema the
metrics callback writes, YAML read safely, one line for anything that does not fit."""

import json
import math
from pathlib import Path

import yaml

from cm_lightning.errors import ConfigError


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def measured(path: Path) -> dict:
    """A run's ``metrics.json``, read as untrusted data: it must be what the metrics callback writes (strings
    ``reference`` and ``feature_extractor``, an integer ``num``, a non-empty ``history`` of measurements, each
    an integer ``step`` and per sampling an integer ``nfe`` and finite metrics). One line for anything else."""
    file = path / "metrics.json"

    def unfit(what: str) -> ConfigError:
        return ConfigError(
            f"{file} is not a metrics file the training runs write: {what}; remove it or the run from runs="
        )

    try:
        data = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise unfit(f"it is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise unfit(f"its top level is a {type(data).__name__}, not an object")
    for key in ("reference", "feature_extractor"):
        if not isinstance(data.get(key), str):
            raise unfit(f"{key}={data.get(key)!r} is not a string")
    if isinstance(data.get("num"), bool) or not isinstance(data.get("num"), int):
        raise unfit(f"num={data.get('num')!r} is not an integer")
    history = data.get("history")
    if not isinstance(history, list) or not history:
        raise unfit("it holds no measurement (history is missing or empty)")
    for entry in history:
        if not isinstance(entry, dict) or isinstance(entry.get("step"), bool) or not isinstance(entry.get("step"), int):
            raise unfit(f"a measurement {str(entry)[:60]!r} has no integer step")
        results = entry.get("results")
        if not isinstance(results, dict):
            raise unfit(f"the measurement at step {entry['step']} has no results")
        for sampling, result in results.items():
            if (
                not isinstance(result, dict)
                or isinstance(result.get("nfe"), bool)
                or not isinstance(result.get("nfe"), int)
            ):
                raise unfit(f"{sampling!r} at step {entry['step']} has no integer nfe")
            bad = [k for k, v in result.items() if not isinstance(k, str) or not is_number(v)]
            if bad:
                raise unfit(
                    f"{sampling!r} at step {entry['step']} has {bad[0]}={result[bad[0]]!r}, not a finite number"
                )
    return data


def overrides_of(path: Path) -> list[str]:
    """Hydra's ``.hydra/overrides.yaml`` of a run: a list of strings, read with ``yaml.safe_load`` (which
    refuses ``!!python/...`` tags)."""
    file = path / ".hydra/overrides.yaml"
    if not file.is_file():
        return []
    try:
        overrides = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file} is not a list of overrides ({type(exc).__name__}); remove it or the run") from None
    if overrides is None:
        return []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{file} is not a list of override strings; remove it or the run from runs=")
    return overrides
