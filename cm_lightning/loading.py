"""Reading networks back from checkpoints: the CD teacher, evaluate.py, the ECT init; and exporting them.

A Lightning checkpoint written by this project carries, under ``"cm_lightning"``, the resolved run
config and what is needed to rebuild the sampler (the parameterisation by name, the EMA rates), so a
checkpoint file is all a user has to keep. Checkpoints written before parameterisations had names carry
``kind``, ``precond`` and ``grid`` instead, which ``checkpoint.upgrade`` reads as the Karras family.

The authors' released files (``edm_imagenet64_ema.pt``, ``cd_imagenet64_l2.pt``, ``ct_bedroom256.pt``, ...)
are plain state dicts of the ADM U-Net, whose keys ``nets/adm.py`` reproduces: they load into the network
of a config the user names (the run's own net for a teacher, ``net=`` in evaluate.py), with the
authors' preconditioning (sigma_data 0.5, the ADM noise conditioning). ``export_state_dict`` writes
our checkpoints in the same format.
"""

import copy
import functools
import itertools
import re
from pathlib import Path

import torch
from hydra.utils import instantiate
from torch import nn

from cm_lightning.checkpoint import META_KEY, from_meta, is_state_dict, num_emas, opened, weights
from cm_lightning.diffusion.parameterisation import Parameterisation
from cm_lightning.diffusion.precond import Precond, consistency_function, edm_denoiser
from cm_lightning.diffusion.trigflow import TrigFlow
from cm_lightning.errors import ConfigError
from cm_lightning.nets.edm_config import EDMState
from cm_lightning.nvlabs_pickle import denoiser_state_dict
from cm_lightning.runtime import atomic
from cm_lightning.sampler import Sampler
from cm_lightning.untrusted import instantiate_trusted, load_file, not_a_file

# Parts of the authors' file names that say which of our net configs rebuilds the network.
AUTHORS_NETS = {"imagenet64": "adm_imagenet64", "bedroom256": "adm_lsun256", "cat256": "adm_lsun256"}
# Where NVlabs publishes EDM's networks (edm-cifar10-32x32-uncond-vp.pkl, ...).
EDM_DOWNLOADS = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"


def is_plain(ckpt: dict) -> bool:
    """A plain state dict (the authors' format) rather than a cm-lightning checkpoint."""
    return META_KEY not in ckpt


def read_checkpoint(path, what: str = "checkpoint") -> dict:
    """A cm-lightning checkpoint (its layout checked and upgraded to today's, ``checkpoint.py``), or a plain state
    dict of tensors (the authors' .pt files) as it is; read with ``weights_only=True`` (``untrusted.py``)."""
    reason = "is not set" if path is None else not_a_file(Path(str(path)).expanduser())
    if reason and Path(str(path)).suffix == ".pkl":
        raise ConfigError(
            f"{what}={path} {reason}; download NVlabs' released network (EDM's: {EDM_DOWNLOADS}"
            f"{Path(str(path)).name}) or pass the path of one"
        )
    if reason:
        raise ConfigError(f"{what}={path} {reason}; pass the path of a run's checkpoints/last.ckpt")
    if Path(str(path)).suffix == ".pkl":  # NVlabs' released EDM / EDM2 networks, read as data
        return denoiser_state_dict(path, what)
    ckpt = load_file(path, what)
    if not isinstance(ckpt, dict) or not (is_state_dict(ckpt) or META_KEY in ckpt):
        raise ConfigError(
            f"{what}={path} is neither a cm-lightning checkpoint (no '{META_KEY}' entry) nor a plain "
            "state dict of tensors (the authors' .pt format)"
        )
    return opened(ckpt, f"{what}={path}") if META_KEY in ckpt else ckpt


def kind_from_name(path) -> str | None:
    """The authors' naming: ``edm_*`` files are EDM denoisers, ``cd_*`` / ``ct_*`` (``ict_``, ``ect_``)
    consistency models."""
    name = Path(str(path)).name.lower()
    if name.startswith("edm") or name.endswith(".pkl"):  # NVlabs' pickles are EDM / EDM2 denoisers
        return "edm"
    return "consistency" if re.match(r"(cd|ct|ict|ect|sct)[_.-]", name) else None


def net_hint(path) -> str:
    """The ``net=`` to name for a file, from the authors' naming where it tells."""
    name = Path(str(path)).name.lower()
    found = [net for part, net in AUTHORS_NETS.items() if part in name]
    return f"net={found[0]}" if found else "net=<the conf/net config it was trained with> (plus net.<key>= overrides)"


def state_dict_mismatch(expected: dict, given: dict, limit: int = 6) -> list[str]:
    """The first differing keys and shapes between two state dicts, as readable lines: in turn a missing
    key, an unexpected one and a shape difference, so that each kind shows; then the totals."""
    kinds = [
        [f"missing {k} {tuple(v.shape)}" for k, v in expected.items() if k not in given],
        [f"unexpected {k} {tuple(v.shape)}" for k, v in given.items() if k not in expected],
        [
            f"{k}: expected {tuple(v.shape)}, got {tuple(given[k].shape)}"
            for k, v in expected.items()
            if k in given and tuple(v.shape) != tuple(given[k].shape)
        ],
    ]
    if not any(kinds):
        return []
    lines = [line for group in itertools.zip_longest(*kinds) for line in group if line is not None][:limit]
    return lines + [f"in all {len(kinds[0])} missing, {len(kinds[1])} unexpected, {len(kinds[2])} of another shape"]


def load_matching(net: nn.Module, state: dict, source: str, fix: str) -> None:
    """Loads ``state`` into ``net`` or stops with the first differing keys and shapes."""
    diff = state_dict_mismatch(net.state_dict(), state)
    if diff:
        raise ConfigError(f"{source} does not match the configured network: " + "; ".join(diff) + f". {fix}")
    net.load_state_dict(state)


def network_from_checkpoint(ckpt: dict, which: str = "ema", index: int | None = None) -> nn.Module:
    """The backbone of a checkpoint with the weights of its EMA ``index`` (default: the one it samples with) or,
    with ``which='net'``, its raw weights."""
    net = instantiate_trusted(ckpt[META_KEY]["config"]["model"]["net"], "the checkpoint's model.net")
    index = ckpt[META_KEY]["sample_ema"] if index is None else index
    source = f"the checkpoint's {'net' if which == 'net' else f'ema.{index}'} weights"
    fix = "The file is damaged or was altered; use a checkpoint a training run wrote"
    load_matching(net, weights(ckpt, which, index), source, fix)
    return net.eval().requires_grad_(False)


def stored_parameterisation(meta: dict):
    """``checkpoint.from_meta`` for stored metadata, a field of the wrong name or kind stopping in one line."""
    try:
        return from_meta(meta)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"the checkpoint's parameterisation {meta.get('parameterisation', meta.get('precond'))!r} cannot be "
            f"rebuilt ({type(exc).__name__}: {exc}); the file is damaged or was altered"
        ) from None


class Teacher(nn.Module):
    """A frozen EDM denoiser D(x, sigma): always in eval mode, no gradients into its weights."""

    def __init__(self, net: nn.Module, parameterisation: Parameterisation):
        super().__init__()
        self.net = net.requires_grad_(False)
        self.parameterisation = parameterisation
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x, sigma, labels=None):
        return self.parameterisation(self.net, x, sigma, labels)


def load_plain(net: nn.Module, state: dict, what: str, path) -> nn.Module:
    """``state`` into ``net``. EDM's networks (an ``EDMState``) are checked against the net first, and the net is
    fed as EDM fed them (c_noise = ln(sigma) / 4) whatever its config's noise_kind."""
    if isinstance(state, EDMState):
        state.check(net, f"{what}={path}")
        net.noise_kind = state.noise_kind
    load_matching(net, state, f"{what}={path}", f"Name the network it was trained with: {net_hint(path)}")
    return net.eval().requires_grad_(False)


def load_teacher(path, like: nn.Module | None = None, sigma_data: float = 0.5) -> Teacher:
    """The frozen EDM teacher of a CD run. A plain state dict (e.g. the authors' ``edm_imagenet64_ema.pt``)
    loads into a copy of ``like``, the run's own network, and is fed that network's conditioning (an NVlabs EDM
    pickle: EDM's, ``load_plain``)."""
    if path is None:
        raise ConfigError(
            "model.teacher_ckpt is not set: CD distils (and ECT tunes) a trained EDM teacher, sCT and sCD start from "
            "a TrigFlow one. Train one with `python train.py experiment=digits_edm` (or experiment=digits_trigflow) "
            "and pass model.teacher_ckpt=<that run>/checkpoints/last.ckpt"
        )
    ckpt = read_checkpoint(path, "model.teacher_ckpt")
    if is_plain(ckpt):
        if kind_from_name(path) == "consistency":
            raise ConfigError(
                f"model.teacher_ckpt={path} is named as a consistency model; the teacher must be "
                "an EDM model, e.g. the authors' edm_imagenet64_ema.pt"
            )
        if like is None:
            raise ConfigError(f"model.teacher_ckpt={path} is a plain state dict; it needs the run's net config")
        net = load_plain(copy.deepcopy(like), ckpt, "model.teacher_ckpt", path)
        return Teacher(net, edm_denoiser(sigma_data, net.noise_kind))
    parameterisation = stored_parameterisation(ckpt[META_KEY])
    if parameterisation.few_step or not isinstance(
        parameterisation, (Precond, TrigFlow)
    ):  # TrigFlow: a diffusion=true teacher
        raise ConfigError(
            f"model.teacher_ckpt={path} is a consistency model's checkpoint; the teacher must come from an EDM run "
            "(experiment=digits_edm, digits_trigflow or another *_edm experiment)"
        )
    return Teacher(network_from_checkpoint(ckpt, "ema"), parameterisation)


def check_ema(meta: dict, ema: int | None) -> None:
    """``ema=`` must index the run's EMAs: its constant rates, then its power-function EMA stds."""
    if ema is not None and not 0 <= ema < num_emas(meta):
        averages = meta["ema_rates"] + meta.get("ema_stds", [])
        raise ConfigError(f"ema={ema} is not an index into the run's EMA rates and stds {averages}")


def plain_sampler(path, state: dict, net=None, kind: str | None = None) -> Sampler:
    """A sampler for a plain state dict: ``net`` (a net config or module, whose ``noise_kind`` it is fed) and
    ``kind`` say what it is; the preconditioning and noise grid are the authors' (sigma_data 0.5, eps 0.002,
    sigma_max 80, rho 7)."""
    kind = kind or kind_from_name(path)
    if kind not in ("consistency", "edm"):
        raise ConfigError(
            f"ckpt={path} is a plain state dict whose name does not say what it is; add "
            "kind=consistency (a CD/CT model) or kind=edm (a diffusion teacher)"
        )
    if net is None and isinstance(state, EDMState):  # EDM's networks say which of ours holds them
        net = state.net_config
    if net is None:
        raise ConfigError(
            f"ckpt={path} is a plain state dict (the authors' format); name its network: {net_hint(path)}"
        )
    net = load_plain(net if isinstance(net, nn.Module) else instantiate(net), state, "ckpt", path)
    make = edm_denoiser if kind == "edm" else consistency_function
    return Sampler(net, make(noise_kind=net.noise_kind))


def read_once(path) -> dict:
    """``ckpt=`` as read, once per command: a task, its scorer and its W&B record share it. Keyed by the file's
    modification time and size too, so that a file rewritten in the same process is read again."""
    file = Path(str(path))
    stamp = (file.stat().st_mtime_ns, file.stat().st_size) if file.is_file() else None
    return _read_once(str(path), stamp)


@functools.lru_cache(maxsize=1)
def _read_once(path: str, stamp) -> dict:
    return read_checkpoint(path, "ckpt")


def sampler_from_checkpoint(path, ema: int | None = None, device="cpu", net=None, kind: str | None = None) -> Sampler:
    """The sampler of a checkpoint file (``read_once``); ``net`` and ``kind`` apply to plain state dicts only."""
    return sampler_from(read_once(path), path, ema, device, net, kind)


def sampler_from(ckpt: dict, path, ema: int | None = None, device="cpu", net=None, kind: str | None = None) -> Sampler:
    """The sampler of ``ckpt``, the checkpoint ``path`` as read."""
    if is_plain(ckpt):
        if ema is not None:
            raise ConfigError(f"ema={ema}: ckpt={path} is a plain state dict with one set of weights; drop ema=")
        sampler = plain_sampler(path, ckpt, net, kind)
        sampler.net.to(device)
        return sampler
    check_ema(ckpt[META_KEY], ema)
    sampler = Sampler(network_from_checkpoint(ckpt, "ema", ema).to(device), stored_parameterisation(ckpt[META_KEY]))
    sampler.decoder = stored_autoencoder(ckpt, path)
    return sampler


def stored_autoencoder(ckpt: dict, path):
    """The VAE a latent run's checkpoint names (its data config's ``autoencoder``), so that whatever samples it
    sees pixels."""
    data = ckpt[META_KEY].get("config", {}).get("data") or {}
    node = data.get("autoencoder")
    return instantiate_trusted(node, f"ckpt={path}: the stored autoencoder") if node else None


def export_state_dict(ckpt: dict, path, out, ema: int | None = None) -> Path:
    """Writes a run's EMA network (``ema``: index into its rates, default the one it samples with) from
    ``ckpt``, the checkpoint ``path`` as read, as a plain state dict, the format of the authors' released files."""
    if is_plain(ckpt):
        raise ConfigError(f"ckpt={path} is already a plain state dict; export reads a run's checkpoint")
    check_ema(ckpt[META_KEY], ema)
    state = weights(ckpt, "ema", ema)
    out = Path(str(out)).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(out) as tmp:
        torch.save(state, tmp)
    return out
