"""Does inpainting (CM Algorithm 4) restore the digit? The rate at which the shipped digits
classifier names the original digit for inpainted images, against chance (10 %) and two naive
fills of the hole: the background value -1, and the mean digit of the data (what the kept pixels
reveal without a generative model).

    python benchmarks/editing_quality.py --ckpt outputs/digits_ct/<date>/checkpoints/last.ckpt \
        [--num 500] [--masks box,left_half,random_strokes] [--edit-sigmas 80 3 1] [--seed 0]
        [--model "the default run (digits_ict, 1,200 steps)"] [--no-record]

Prints one JSON line per mask and a table, appends the lines to benchmarks/results/editing_quality.jsonl and
rewrites docs/results.md from them (benchmarks/write_results.py). The digits are a seeded subset of the embedded
data (the generator saw all of them in training; the classifier's held-out accuracy is 100 %).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cm_lightning.data.digits import digits_tensor  # noqa: E402
from cm_lightning.diffusion import editing  # noqa: E402
from cm_lightning.diffusion.linear_transforms import Identity  # noqa: E402
from cm_lightning.loading import read_once, sampler_from_checkpoint  # noqa: E402
from cm_lightning.metrics.digits_classifier import load_pretrained_digits_classifier  # noqa: E402
from cm_lightning.tasks.editing import edit_levels  # noqa: E402
from cm_lightning.tasks.editing_inputs import box_mask, left_half_mask, random_stroke_mask  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import write_results  # noqa: E402


def masks(name: str, num: int, size: int, seed: int) -> torch.Tensor:
    if name == "box":
        return box_mask(size).expand(num, 1, size, size)
    if name == "left_half":
        return left_half_mask(size).expand(num, 1, size, size)
    g = torch.Generator().manual_seed(seed)
    return torch.stack([random_stroke_mask(size, g) for _ in range(num)])


@torch.no_grad()
def rate(classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return round((classifier(images).argmax(1) == labels).float().mean().item(), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--masks", default="box,left_half,random_strokes")
    parser.add_argument("--edit-sigmas", type=float, nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="what the checkpoint is, for docs/results.md (default: its path)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave benchmarks/results/ as it is")
    args = parser.parse_args()

    sampler = sampler_from_checkpoint(args.ckpt)
    if sampler.image_shape != (1, 16, 16):
        sys.exit(
            f"--ckpt {args.ckpt} makes {sampler.image_shape} images; this benchmark needs a 1x16x16 digits "
            "model such as the default `python train.py`"
        )
    levels = edit_levels(args.edit_sigmas, read_once(args.ckpt), sampler.parameterisation)
    x, y = digits_tensor(16)
    mean_digit = x.mean(0, keepdim=True)
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))[: args.num]
    x, y = x[pick], y[pick]
    classifier = load_pretrained_digits_classifier()
    f = lambda z, s: sampler.denoise(z, s)  # noqa: E731
    rows = []
    for name in args.masks.split(","):
        omega = masks(name, len(y), 16, args.seed)
        background, mean_fill = x * (1 - omega) - omega, x * (1 - omega) + mean_digit * omega
        out = editing.edit(
            f, x, Identity(), omega, levels, sampler.parameterisation, torch.Generator().manual_seed(args.seed)
        )
        row = {
            "study": "inpainting",
            "mask": name,
            "hidden": round(omega.mean().item(), 3),
            "levels": [round(s, 3) for s in levels],
            "original": rate(classifier, x, y),
            "hole at -1": rate(classifier, background, y),
            "hole at mean digit": rate(classifier, mean_fill, y),
            "inpainted": rate(classifier, out, y),
            "chance": 0.1,
            "num": len(y),
            "ckpt": args.model or str(args.ckpt),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    if not args.no_record:
        write_results.append("editing_quality", rows)
        write_results.PAGE.write_text(write_results.render())
    print(f"\n{'mask':16}{'hidden':>8}{'original':>10}{'hole -1':>9}{'hole mean':>11}{'inpainted':>11}   (chance 0.10)")
    for r in rows:
        print(
            f"{r['mask']:16}{r['hidden']:8.2f}{r['original']:10.3f}{r['hole at -1']:9.3f}"
            f"{r['hole at mean digit']:11.3f}{r['inpainted']:11.3f}"
        )


if __name__ == "__main__":
    main()
