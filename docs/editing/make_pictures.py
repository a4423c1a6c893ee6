"""Rebuilds the README's zero-shot editing pictures: the example inputs under docs/editing/ and one
picture per task, each made by running `python evaluate.py task=...` as the README shows.

    python docs/editing/make_pictures.py --ckpt outputs/digits_ct/<date>/checkpoints/last.ckpt \
        [--colour-ckpt outputs/digits_colour_ct/<date>/checkpoints/last.ckpt]

The pictures are the grids evaluate.py writes, enlarged 4x (nearest neighbour) to be visible.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw
from torchvision.utils import save_image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from cm_lightning.data.digits import colour_digits_tensor, digits_tensor  # noqa: E402

# Coarse stroke paintings on the 16x16 canvas: polylines (and one ellipse), white on black like the digits.
STROKES = {
    "zero": [("ellipse", (4, 2, 11, 13))],
    "one": [("line", [(8, 2), (8, 13)])],
    "two": [("line", [(4, 4), (7, 2), (11, 4), (4, 13), (12, 13)])],
    "four": [("line", [(10, 2), (3, 9), (12, 9)]), ("line", [(10, 2), (10, 13)])],
    "seven": [("line", [(4, 3), (11, 3), (6, 13)])],
}


def write_inputs(count: int = 6) -> None:
    """docs/editing/{digits,colour_digits,strokes}/: the first digit of each class 0..count-1, and strokes."""
    gray, labels = digits_tensor(16)
    colour, _ = colour_digits_tensor(16)
    for folder, images in (("digits", gray), ("colour_digits", colour)):
        (HERE / folder).mkdir(exist_ok=True)
        for k in range(count):
            i = int((labels == k).nonzero()[0])
            save_image((images[i] + 1) / 2, HERE / folder / f"{k}.png")
    (HERE / "strokes").mkdir(exist_ok=True)
    for name, shapes in STROKES.items():
        img = Image.new("L", (16, 16), 0)
        draw = ImageDraw.Draw(img)
        for kind, xy in shapes:
            if kind == "ellipse":
                draw.ellipse(xy, outline=255, width=2)
            else:
                draw.line(xy, fill=255, width=2)
        img.save(HERE / "strokes" / f"{name}.png")


def run(ckpt: Path, task: str, out: Path, *overrides: str) -> Path:
    cmd = [
        sys.executable,
        str(ROOT / "evaluate.py"),
        f"task={task}",
        f"ckpt={ckpt}",
        *overrides,
        f"hydra.run.dir={out}",
    ]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out / f"{task}.png"


def publish(grid: Path, name: str, scale: int = 4) -> None:
    img = Image.open(grid)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(HERE / f"{name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="a 1-channel digits run (python train.py)")
    parser.add_argument("--colour-ckpt", type=Path, help="a colour digits run (experiment=digits_colour_ct)")
    args = parser.parse_args()
    write_inputs()
    digits, strokes = "input=docs/editing/digits", "input=docs/editing/strokes"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        publish(run(args.ckpt, "inpaint", tmp / "box", digits, "mask=box"), "inpaint_box")
        publish(run(args.ckpt, "inpaint", tmp / "strokes", digits, "mask=random_strokes"), "inpaint_random_strokes")
        publish(run(args.ckpt, "superres", tmp / "sr", digits, "factor=4"), "superres")
        publish(run(args.ckpt, "stroke", tmp / "stroke", strokes), "stroke")
        publish(run(args.ckpt, "denoise", tmp / "denoise", digits), "denoise")
        publish(run(args.ckpt, "interpolate", tmp / "interp", "num=10"), "interpolate")
        if args.colour_ckpt:
            publish(run(args.colour_ckpt, "colorize", tmp / "colour", "input=docs/editing/colour_digits"), "colorize")


if __name__ == "__main__":
    main()
