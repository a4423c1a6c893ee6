"""EDM2's post-hoc EMA (Karras et al. 2024, Section 3.2 and Algorithm 3): the power-function EMA of any relative
std, rebuilt after training from the power EMAs (``model.ema_stds``) stored in a run's step checkpoints.

    python -m cm_lightning.modules.posthoc_ema outputs/<run>/checkpoints 0.075 [--out FILE]

writes a copy of the newest checkpoint with the rebuilt average appended as one more power EMA, which samples by
default (``evaluate.py ckpt=FILE``); the weights are a least-squares fit of that profile by the stored ones
(``ema.posthoc_coefficients``), so more snapshots and a std between the stored ones fit best.
"""

import argparse
import sys
from pathlib import Path

import torch

from cm_lightning.checkpoint import META_KEY, ema_prefix
from cm_lightning.checkpoint import weights as weights_of
from cm_lightning.errors import ConfigError
from cm_lightning.modules.ema import posthoc_coefficients
from cm_lightning.runtime import atomic
from cm_lightning.untrusted import load_file


def snapshots(paths) -> list[dict]:
    """The readable checkpoints among ``paths`` that hold power EMAs, one per step (``last.ckpt`` repeats one)."""
    by_step = {}
    for path in paths:
        ckpt = load_file(path, "a snapshot", mmap=True)
        if isinstance(ckpt, dict) and isinstance(ckpt.get(META_KEY), dict) and ckpt[META_KEY].get("ema_stds"):
            by_step.setdefault(int(ckpt["global_step"]), ckpt)
    return [by_step[k] for k in sorted(by_step)]


def reconstruct(paths, std: float) -> dict:
    """The newest of ``paths`` with the power EMA of ``std`` at its step appended (its index: ``sample_ema``)."""
    found = snapshots(paths)
    if len(found) < 2:
        raise ConfigError(
            f"post-hoc EMA needs at least two checkpoints with model.ema_stds at different steps, found {len(found)}; "
            "keep step checkpoints (callbacks.checkpoint.save_top_k=-1) of a run with power-function EMAs"
        )
    latest, meta = found[-1], found[-1][META_KEY]
    first = len(meta["ema_rates"])
    entries = [(ckpt, first + i, s) for ckpt in found for i, s in enumerate(ckpt[META_KEY]["ema_stds"])]
    steps, stds = [ckpt["global_step"] for ckpt, _, _ in entries], [s for _, _, s in entries]
    weights = posthoc_coefficients(steps, stds, latest["global_step"], std)
    out = len(meta["ema_rates"]) + len(meta["ema_stds"])
    state = dict(latest["state_dict"])
    sources = [weights_of(ckpt, "ema", index) for ckpt, index, _ in entries]
    for name in weights_of(latest, "ema", first):
        tensors = [source[name] for source in sources]
        if tensors[0].is_floating_point():
            mix = sum(float(w) * t.double() for w, t in zip(weights, tensors))
            state[ema_prefix(out) + name] = mix.to(tensors[0].dtype)
        else:
            state[ema_prefix(out) + name] = tensors[-1].clone()
    meta = {**meta, "ema_stds": [*meta["ema_stds"], float(std)], "sample_ema": out}
    return {**latest, "state_dict": state, META_KEY: meta}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cm_lightning.modules.posthoc_ema", description=__doc__)
    parser.add_argument("checkpoints", type=Path, help="a run's checkpoints/ directory, or checkpoint files", nargs="+")
    parser.add_argument("std", type=float, help="the relative std of the EMA to rebuild, e.g. 0.075")
    parser.add_argument("--out", type=Path, help="the file to write (default: <dir>/posthoc_<std>.ckpt)")
    args = parser.parse_args(argv)
    found = [p for given in args.checkpoints for p in (sorted(given.glob("*.ckpt")) if given.is_dir() else [given])]
    paths = [p for p in found if not p.name.startswith("posthoc_")]  # earlier reconstructions are not snapshots
    first = args.checkpoints[0]
    out = args.out or (first if first.is_dir() else first.parent) / f"posthoc_{args.std:.3f}.ckpt"
    try:
        if out.exists():
            raise ConfigError(f"--out {out} exists; choose another file")
        with atomic.replacing(out) as tmp:
            torch.save(reconstruct(paths, args.std), tmp)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
