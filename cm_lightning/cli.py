"""What the entry points share: Hydra resolvers and turning user mistakes into one clear message."""

import functools
import netrc
import os
import sys
from pathlib import Path

from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from cm_lightning.errors import ConfigError, TrainingError
from cm_lightning.speed import auto_precision


def wandb_offline() -> bool:
    """Offline unless the user has configured W&B: an API key, WANDB_MODE, or a netrc login."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return False
    try:
        return netrc.netrc(Path.home() / ".netrc").authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def wandb_mode() -> str:
    """wandb.init's mode: WANDB_MODE when set, else offline unless W&B is configured. Lightning's own
    ``offline`` flag refuses ``log_model``; W&B's offline mode keeps artifacts for ``wandb sync``."""
    return os.environ.get("WANDB_MODE") or ("offline" if wandb_offline() else "online")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("wandb_mode"):
        OmegaConf.register_new_resolver("wandb_mode", wandb_mode)
    if not OmegaConf.has_resolver("auto_precision"):
        OmegaConf.register_new_resolver("auto_precision", auto_precision)


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None and isinstance(exc, InstantiationException):
        exc = exc.__cause__
    return exc


def user_errors(fn):
    """Prints a user's configuration mistake as one line and exits 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, InstantiationException, MissingMandatoryValue) as exc:
            cause = _root_cause(exc)
            if not isinstance(cause, (ConfigError, MissingMandatoryValue, FileNotFoundError, ValueError)):
                raise
            print(f"error: {cause}", file=sys.stderr)
            sys.exit(2)
        except TrainingError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)

    return wrapper
