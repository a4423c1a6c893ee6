"""NVlabs EDM's backbone weights laid out as this project's networks hold them: ``SongUNet`` (DDPM++, NCSN++)
as ``NCSNpp``, ``DhariwalUNet`` (ADM) as ``ADMUNet`` (``edm_config.py`` says which config that net has).

What differs from our layout (NVlabs/edm ``training/networks.py``), each undone here:

- names: ``DhariwalUNet`` keeps a residual block and its attention in one ``UNetBlock`` named by resolution
  (``enc.32x32_block0``), ADM in two numbered modules (``input_blocks.4.0`` and ``.1``); SongUNet's output layers
  are ``dec.32x32_aux_norm`` / ``aux_conv``, ours ``out_norm`` / ``out_conv``;
- qkv: EDM reads q, k and v interleaved per channel (output channel 3 j + i), ours in three blocks (i C + j);
- SongUNet swaps its noise embedding to [sin, cos] before ``map_layer0``, ours stays [cos, sin]: the layer's
  input columns are swapped instead;
- labels: EDM feeds one-hot vectors to a ``Linear`` (SongUNet's scaled by sqrt(label_dim), with a bias), ours
  index an ``Embedding``: its rows are the Linear's columns (times that scale, plus the bias);
- ``map_augment``: EDM's CIFAR-10 / FFHQ / AFHQ nets take a 9-dimensional augmentation label that EDM's sampler,
  and ECT's and sCM's tuning runs (augment 0), never pass. Not passing it is passing zeros through a bias-free
  layer, so our nets have no such input and the weight is dropped;
- ``resample_filter`` buffers: our resampling filters are rebuilt from the config, not stored.
"""

from __future__ import annotations

import math

import torch

from cm_lightning.errors import ConfigError
from cm_lightning.nets.edm_config import full_kwargs

DROPPED = ("map_augment.weight",)  # EDM's augmentation-label input, see above


def interleaved_qkv(value: torch.Tensor) -> torch.Tensor:
    """EDM's qkv rows (channel j's q, k, v together) as ours (all q, then all k, then all v)."""
    return value.reshape(-1, 3, *value.shape[1:]).transpose(0, 1).reshape(value.shape)


def swapped_halves(value: torch.Tensor, dim: int) -> torch.Tensor:
    """[a, b] -> [b, a] along ``dim``: EDM's [sin, cos] embedding order as ours."""
    a, b = value.chunk(2, dim=dim)
    return torch.cat([b, a], dim=dim)


def song_key(key: str) -> str:
    """SongUNet's name of a weight -> NCSNpp's (the two share their block names)."""
    parts = key.split(".")
    if parts[0] == "dec" and parts[1].endswith(("_aux_norm", "_aux_conv")):
        return f"out_{parts[1].rsplit('_', 1)[1]}.{parts[2]}"
    if parts[0] == "enc" and parts[1].endswith("_aux_residual"):
        return f"enc.{parts[1]}.1.{parts[2]}"
    return key


def song_state(state: dict, kw: dict) -> dict:
    """SongUNet's state dict in NCSNpp's layout."""
    out = {song_key(k): interleaved_qkv(v) if ".qkv." in k else v for k, v in state.items()}
    out["map_layer0.weight"] = swapped_halves(out["map_layer0.weight"], 1)
    if kw["label_dim"]:
        rows = out.pop("map_label.weight").t() * math.sqrt(kw["label_dim"]) + out.pop("map_label.bias")
        out["map_label.weight"] = swapped_halves(rows, 1)
    return out


# DhariwalUNet's parts of a UNetBlock -> ADM's, in its residual block and in its attention block.
RESIDUAL = {"norm0": "in_layers.0", "conv0": "in_layers.2", "affine": "emb_layers.1", "norm1": "out_layers.0"}
RESIDUAL |= {"conv1": "out_layers.3", "skip": "skip_connection"}
ATTENTION = {"norm2": "norm", "qkv": "qkv", "proj": "proj_out"}


def dhariwal_blocks(kw: dict) -> dict[str, tuple[str, str | None]]:
    """DhariwalUNet's block names -> (ADM's residual block, ADM's attention block), both as key prefixes."""
    res = [kw["img_resolution"] >> level for level in range(len(kw["channel_mult"]))]
    blocks, k = {f"enc.{res[0]}x{res[0]}_conv": ("input_blocks.0.0", None)}, 1
    for level, r in enumerate(res):  # the encoder: one numbered block per UNetBlock, in EDM's order
        for name in ([f"{r}x{r}_down"] if level else []) + [f"{r}x{r}_block{i}" for i in range(kw["num_blocks"])]:
            blocks[f"enc.{name}"], k = (f"input_blocks.{k}.0", f"input_blocks.{k}.1"), k + 1
    r = res[-1]
    blocks |= {f"dec.{r}x{r}_in0": ("middle_block.0", "middle_block.1"), f"dec.{r}x{r}_in1": ("middle_block.2", None)}
    k = 0
    for level in reversed(range(len(res))):  # ADM upsamples at the end of a level's last block, EDM first thing
        r = res[level]
        if level < len(res) - 1:
            position = 2 if res[level + 1] in kw["attn_resolutions"] else 1
            blocks[f"dec.{r}x{r}_up"] = (f"output_blocks.{k - 1}.{position}", None)
        for i in range(kw["num_blocks"] + 1):
            blocks[f"dec.{r}x{r}_block{i}"], k = (f"output_blocks.{k}.0", f"output_blocks.{k}.1"), k + 1
    return blocks


TOP = {"map_layer0": "time_embed.0", "map_layer1": "time_embed.2", "map_label": "label_emb"}
TOP |= {"out_norm": "out.0", "out_conv": "out.2"}


def dhariwal_key(key: str, blocks: dict) -> str:
    """DhariwalUNet's name of a weight -> ADMUNet's."""
    parts = key.split(".")
    owner = ".".join(parts[:2])
    if owner not in blocks:
        return f"{TOP[parts[0]]}.{parts[1]}"
    residual, attention = blocks[owner]
    if len(parts) == 3:  # the encoder's first convolution
        return f"{residual}.{parts[2]}"
    part = parts[2]
    target = f"{residual}.{RESIDUAL[part]}" if part in RESIDUAL else f"{attention}.{ATTENTION[part]}"
    return f"{target}.{parts[3]}"


def dhariwal_state(state: dict, kw: dict) -> dict:
    """DhariwalUNet's state dict in ADMUNet's layout."""
    blocks = dhariwal_blocks(kw)
    out = {dhariwal_key(k, blocks): interleaved_qkv(v) if ".qkv." in k else v for k, v in state.items()}
    if kw["label_dim"]:  # one-hot through a bias-free Linear: its columns
        out["label_emb.weight"] = out["label_emb.weight"].t()
    return out


def convert(class_name: str, kwargs: dict, state: dict, source: str) -> dict:
    """EDM's ``class_name`` backbone's state dict, made with keywords ``kwargs``, in our net's layout; one line
    naming the first weight that has no place in it."""
    kw = full_kwargs(class_name, kwargs, source)
    kept = {k: v for k, v in state.items() if k not in DROPPED and not k.endswith(".resample_filter")}
    try:
        return (song_state if class_name == "SongUNet" else dhariwal_state)(kept, kw)
    except (KeyError, IndexError) as exc:
        raise ConfigError(
            f"{source}: the weight {exc} of its {class_name} has no place in this project's net; the file does not "
            "match its recorded constructor keywords"
        ) from None
