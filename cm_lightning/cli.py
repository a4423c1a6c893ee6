"""What the entry points share: Hydra resolvers and turning user mistakes into one clear message."""

import functools
import os
import sys
from importlib.resources import files
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, OmegaConfBaseException

from cm_lightning import wandb_runs
from cm_lightning.errors import ConfigError, TrainingError
from cm_lightning.runtime.speed import auto_precision

# Optional dependencies (pyproject.toml's extras) and the extra that installs each.
EXTRAS = {"lmdb": "lsun", "tensorboard": "tensorboard", "wandb_workspaces": "report"}
RESOLVERS = {
    "wandb_mode": wandb_runs.wandb_mode,
    "auto_precision": auto_precision,
    "wandb_name": wandb_runs.run_name,
    "wandb_group": wandb_runs.group,
    "wandb_tags": wandb_runs.tags,
}


# The exceptions that are a user's value (wrapped by Hydra or not), printed as one line.
USER_CAUSES = (
    ConfigError,
    MissingMandatoryValue,
    InterpolationResolutionError,
    FileNotFoundError,
    ValueError,
    TypeError,
)


def register_resolvers() -> None:
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None and isinstance(exc, InstantiationException):
        exc = exc.__cause__
    return exc


def missing_extra(exc: BaseException) -> str | None:
    """The one-line fix when ``exc`` comes from an optional dependency that is not installed."""
    while exc is not None:
        if isinstance(exc, ModuleNotFoundError) and exc.name in EXTRAS:
            return f"{exc.name} is not installed; pip install 'cm-lightning[{EXTRAS[exc.name]}]'"
        exc = exc.__cause__ or exc.__context__
    return None


def user_errors(fn):
    """Prints a user's configuration mistake as one line and exits 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (
            ConfigError,
            InstantiationException,
            MissingMandatoryValue,
            InterpolationResolutionError,
            ImportError,
        ) as exc:
            cause = _root_cause(exc)
            message = missing_extra(exc) or cause
            # A TypeError or ValueError under Hydra's wrapper is a constructor refusing a value (or a keyword it
            # does not take): its own message, not Hydra's "Error in call to target" and a traceback.
            if not isinstance(message, str) and not isinstance(cause, USER_CAUSES):
                raise
            if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
                message = f"{cause.full_key}: {cause.msg.splitlines()[0]}"  # the key, not OmegaConf's multi-line dump
            print("error: " + " ".join(str(message).split()), file=sys.stderr)
            sys.exit(2)
        except TrainingError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)

    return wrapper


def config_dir() -> Path:
    """The configs: conf/ beside the package in a source checkout (editable installs included), else the copy
    installed inside the package as cm_lightning/conf (pyproject.toml maps it there)."""
    checkout = Path(__file__).resolve().parents[1] / "conf"
    if (checkout / "train.yaml").is_file():
        return checkout
    return Path(str(files("cm_lightning") / "conf"))


def output_dir_problem(args: list[str]) -> str | None:
    """Hydra makes ``hydra.run.dir`` / ``hydra.sweep.dir`` before any of this project's code runs, and a path on
    or under a file, or under a folder it cannot write, ends there in a traceback: checked first, one line."""
    for arg in args:
        key, _, value = arg.lstrip("+").partition("=")
        if key not in ("hydra.run.dir", "hydra.sweep.dir") or not value or "${" in value:
            continue
        path = Path(value).expanduser().absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            return f"{key}={value} lies on or under the file {existing}; choose a directory"
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"{key}={value}: {existing} is not writable; choose a directory you can write to"
    return None


def _run_hydra(config_name: str, task) -> None:
    problem = output_dir_problem(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    register_resolvers()
    hydra.main(config_path=str(config_dir()), config_name=config_name, version_base="1.3")(user_errors(task))()


def train_main() -> None:
    """``cm-train`` and ``python train.py``: conf/train.yaml with the command line's overrides."""
    from cm_lightning.training import train  # imported when run: cm-evaluate need not import the training stack

    _run_hydra("train", train)


def has_key(cfg, dotted: str) -> bool:
    *parents, leaf = dotted.split(".")
    for part in parents:
        cfg = cfg.get(part)
        if not OmegaConf.is_dict(cfg):
            return False
    return leaf in cfg.keys()  # keys(): a mandatory value (???) counts too


def shared_sweep_options(args: list[str]) -> list[str]:
    """A sweep over several tasks (``-m task=fid,inpaint ...``) gives every job the same options, and Hydra also
    composes them with the default task for the sweep itself: an option that only some of these read reaches
    the others as ``++key=value``, kept and unread. An option that none of them reads is left to fail, as it
    does in a single run, where another task's option is refused."""
    swept = [a.split("=", 1)[1].split(",") for a in args if a.startswith("task=")]
    if not {"-m", "--multirun"} & set(args) or not swept or len(swept[0]) < 2:
        return args
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        configs = [compose("evaluate", overrides) for overrides in [[], *([f"task={t}"] for t in swept[0])]]
    shared = []
    for arg in args:
        key = arg.split("=", 1)[0]
        plain = "=" in arg and not arg.startswith(("+", "~", "-", "hydra.", "task="))
        found = [has_key(cfg, key) for cfg in configs] if plain else []
        shared.append(f"++{arg}" if any(found) and not all(found) else arg)
    return shared


def evaluate_main() -> None:
    """``cm-evaluate`` and ``python evaluate.py``: conf/evaluate.yaml with the command line's overrides."""
    from cm_lightning.tasks.dispatch import evaluate

    sys.argv[1:] = shared_sweep_options(sys.argv[1:])
    _run_hydra("evaluate", evaluate)
