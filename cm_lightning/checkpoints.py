"""Reading networks back from cm-lightning checkpoints: the CD teacher, evaluate.py, the ECT init.

A Lightning checkpoint written by this project carries, under ``"cm_lightning"``, the resolved run
config and what is needed to rebuild the sampler (kind, preconditioning, EMA rates), so a
checkpoint file is all a user has to keep.
"""

from pathlib import Path

import torch
from hydra.utils import instantiate
from torch import nn

from cm_lightning.diffusion.precond import Precond
from cm_lightning.errors import ConfigError
from cm_lightning.sampler import Sampler

META_KEY = "cm_lightning"


def read_checkpoint(path, what: str = "checkpoint") -> dict:
    if path is None or not Path(str(path)).expanduser().is_file():
        raise ConfigError(f"{what}={path} does not exist; pass the path of a run's checkpoints/last.ckpt")
    ckpt = torch.load(Path(str(path)).expanduser(), map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or META_KEY not in ckpt:
        raise ConfigError(f"{what}={path} is not a cm-lightning checkpoint (no '{META_KEY}' entry)")
    return ckpt


def state_dict_mismatch(expected: dict, given: dict, limit: int = 5) -> list[str]:
    """The first differing keys and shapes between two state dicts, as readable lines."""
    lines = [f"missing {k} {tuple(v.shape)}" for k, v in expected.items() if k not in given]
    lines += [f"unexpected {k} {tuple(v.shape)}" for k, v in given.items() if k not in expected]
    lines += [
        f"{k}: expected {tuple(v.shape)}, got {tuple(given[k].shape)}"
        for k, v in expected.items()
        if k in given and tuple(v.shape) != tuple(given[k].shape)
    ]
    return lines[:limit]


def load_matching(net: nn.Module, state: dict, source: str, fix: str) -> None:
    """Loads ``state`` into ``net`` or stops with the first differing keys and shapes."""
    diff = state_dict_mismatch(net.state_dict(), state)
    if diff:
        raise ConfigError(f"{source} does not match the configured network: " + "; ".join(diff) + f". {fix}")
    net.load_state_dict(state)


def network_from_checkpoint(ckpt: dict, which: str = "ema") -> nn.Module:
    """The backbone of a checkpoint with its EMA weights (``which='ema'``) or raw weights (``'net'``)."""
    meta = ckpt[META_KEY]
    net = instantiate(meta["config"]["model"]["net"])
    prefix = f"ema.{meta['sample_ema']}." if which == "ema" else "net."
    net.load_state_dict({k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)})
    return net.eval().requires_grad_(False)


class Teacher(nn.Module):
    """A frozen EDM denoiser D(x, sigma): always in eval mode, no gradients into its weights."""

    def __init__(self, net: nn.Module, precond: Precond):
        super().__init__()
        self.net = net.requires_grad_(False)
        self.precond = precond
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x, sigma, labels=None):
        return self.precond(self.net, x, sigma, labels)


def load_teacher(path) -> Teacher:
    if path is None:
        raise ConfigError(
            "model.teacher_ckpt is not set: CD distils a trained EDM teacher. Train one with "
            "`python train.py experiment=digits_edm` and pass model.teacher_ckpt=<that run>/checkpoints/last.ckpt"
        )
    ckpt = read_checkpoint(path, "model.teacher_ckpt")
    meta = ckpt[META_KEY]
    if meta["kind"] != "edm":
        raise ConfigError(
            f"model.teacher_ckpt={path} is a '{meta['kind']}' checkpoint; the teacher must come from an EDM run "
            "(experiment=digits_edm or another *_edm experiment)"
        )
    return Teacher(network_from_checkpoint(ckpt, "ema"), Precond(**meta["precond"]))


def sampler_from_checkpoint(path, ema: int | None = None, device="cpu") -> Sampler:
    ckpt = read_checkpoint(path, "ckpt")
    meta = ckpt[META_KEY]
    if ema is not None:
        if not 0 <= ema < len(meta["ema_rates"]):
            raise ConfigError(f"ema={ema} is not an index into the run's EMA rates {meta['ema_rates']}")
        meta["sample_ema"] = ema
    net = network_from_checkpoint(ckpt, "ema").to(device)
    return Sampler(net, Precond(**meta["precond"]), meta["kind"], **meta["grid"])
