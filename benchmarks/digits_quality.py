"""Sample quality on the embedded digits for a fixed CPU budget: the EDM and TrigFlow teachers, CD, CT, iCT, ECT,
sCT, sCD, MeanFlow and iMF (U-Net and tiny DiT; two steps also with the re-noising chain), and the latent twins.

Trains ``digits_edm`` and ``digits_trigflow``, then ``digits_cd`` and ``digits_ect`` from the EDM teacher and
``digits_sct`` and ``digits_scd`` from the TrigFlow one (``--teacher sct=edm`` swaps), and the from-scratch rows through
train.py (each for the steps its experiment sets, unless overridden; sCM's and MeanFlow's step budgets match iCT's and
CD's wall-clock time, since a JVP step costs more than a discrete one; ``--seed`` reruns the students), samples 1,797
images from each (as many as the dataset holds), prints one JSON line per row and a table, appends the lines to
benchmarks/results/digits_quality.jsonl and rewrites docs/results.md from them (benchmarks/write_results.py; a
``--study`` other than the default ``budgets`` needs its table named in benchmarks/results/results.md.in). Consistency
models are scored at one step, at two steps with the default midpoint (the middle of a 3-point Karras grid, sigma = 2.5;
sCM: t = 1.1), and at two steps with the midpoint the authors' ternary search picks (ts = (0, p, 39) of 40):

    FID in the features of a small digits classifier (torch-fidelity, extractor "digits-classifier",
    held-out accuracy 100 %) between the samples and the whole dataset, plus IS from its logits.

Why this figure: Inception features know nothing of 16x16 grayscale digits, while this classifier's
penultimate layer separates exactly the modes a digits model must cover; FID in it punishes both
blur (features collapse) and missing classes (means shift). Reference points: two disjoint halves
of the real data score about 15 (finite-sample bias at 898 images); noise scores over 2,000.

    python benchmarks/digits_quality.py [--out DIR] [--rows edm,cd,ct] [--set row:key=value ...]
        [--study ict_s1 --setting "s1 = 40"] [--no-record] [--teacher sct=edm] [--seed 1]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cm_lightning.data.digits import digits_tensor  # noqa: E402
from cm_lightning.diffusion.sampling import sigmas_from_indices  # noqa: E402
from cm_lightning.loading import sampler_from_checkpoint  # noqa: E402
from cm_lightning.metrics.digits_fidelity import digits_metrics  # noqa: E402
from cm_lightning.metrics.fidelity import to_uint8  # noqa: E402
from cm_lightning.metrics.midpoint_search import ternary_search  # noqa: E402
from cm_lightning.tasks.common import sample_batched  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import write_results  # noqa: E402

TEACHER_STEPS = [("18-step Heun", dict(steps=18))]
FEW_STEPS = [("1 step", dict(steps=1)), ("2 steps", dict(steps=2))]
# MeanFlow's 2 steps are its own jumps (the default chain); CM's re-noising chain is scored beside them.
MEANFLOW_STEPS = [*FEW_STEPS, ("2 steps, re-noising", dict(steps=2, chain="renoise"))]
ROWS = {  # row -> (experiment, its name in docs/results.md, which samplings to score)
    "edm": ("digits_edm", "EDM teacher", TEACHER_STEPS),
    "trigflow": ("digits_trigflow", "TrigFlow teacher", TEACHER_STEPS),
    "cd": ("digits_cd", "CD", FEW_STEPS),
    "ct": ("digits_ct", "CT", FEW_STEPS),
    "ict": ("digits_ict", "iCT", FEW_STEPS),
    "ect": ("digits_ect", "ECT", FEW_STEPS),
    "sct": ("digits_sct", "sCT", FEW_STEPS),
    "scd": ("digits_scd", "sCD", FEW_STEPS),
    "meanflow": ("digits_meanflow", "MeanFlow", MEANFLOW_STEPS),
    "meanflow_dit": ("digits_meanflow_dit", "MeanFlow, tiny DiT", MEANFLOW_STEPS),
    "imeanflow": ("digits_imeanflow", "iMF", MEANFLOW_STEPS),
    "latent_edm": ("digits_latent_edm", "EDM teacher, latents", TEACHER_STEPS),
    "latent_ict": ("digits_latent_ict", "iCT, latents", FEW_STEPS),
    "latent_meanflow": ("digits_latent_meanflow", "MeanFlow, latents", MEANFLOW_STEPS),
}
# Rows that start from a teacher, and which: sCT and sCD start from the TrigFlow teacher (sCM, Algorithm 1),
# CD and ECT from the EDM one. --teacher sct=edm starts sCT or sCD from the EDM teacher instead, fed its
# conditioning so that the student starts as that teacher (docs/scm.md).
TEACHERS = {"cd": "edm", "ect": "edm", "sct": "trigflow", "scd": "trigflow"}
EDM_CONDITIONING = ["net.noise_kind=edm", "model.objective.parameterisation.noise_kind=edm"]
TEACHER_ROWS = ("edm", "trigflow", "latent_edm")
TEACHER_SWITCH = {("sct", "edm"): EDM_CONDITIONING, ("scd", "edm"): EDM_CONDITIONING}


def train(experiment: str, out: Path, extra: list[str]) -> tuple[Path, float]:
    start = time.time()
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        f"experiment={experiment}",
        f"hydra.run.dir={out}",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        *extra,
    ]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out / "checkpoints/last.ckpt", time.time() - start


def score(ckpt: Path, how, reference: torch.Tensor, seed: int = 1) -> dict:
    """``how``: sampler options, or a function of the sampler giving them (levels in its parameterisation)."""
    sampler = sampler_from_checkpoint(ckpt)
    how = how(sampler) if callable(how) else how
    images, _ = sample_batched(sampler, reference.shape[0], 512, seed=seed, device="cpu", **how)
    m = digits_metrics(to_uint8(images), reference, isc=True, fid=True)
    return {"fid": round(m["frechet_inception_distance"], 2), "is": round(m["inception_score_mean"], 2)}


def searched_two_step(ckpt: Path, reference: torch.Tensor) -> tuple[dict, dict]:
    """The authors' way to pick a two-step sampler: ternary search of the midpoint p in ts = (0, p, 39) of
    40 on FID. The search samples with seed 2 and the reported score with seed 1, so that the number is
    not the minimum of noisy draws."""
    sigmas = lambda p: sigmas_from_indices([0, p, 39], 40)  # noqa: E731
    how = lambda p: lambda sampler: sampler.at_sigmas(sigmas(p))  # noqa: E731
    best, _ = ternary_search(lambda p: score(ckpt, how(p), reference, seed=2)["fid"], 1, 38)
    return how(best), {"ts": [0, best, 39], "sigma_mid": round(sigmas(best)[1], 3)}


def plan(row: str, overrides: list[str], teacher: str | None, seed: int | None, out: Path):
    """A row's run directory, its overrides (which name the row) and the teacher's path. The directory,
    ``<row>[-from_<teacher>][-<overrides>][-seed<N>]`` under ``out``, differs for every setting, so that no run
    resumes another's checkpoint; a teacher other than the row's own brings the conditioning it needs; a seed
    changes the student, never the teacher."""
    name = row + (f"-from_{teacher}" if teacher != TEACHERS.get(row) else "")
    if overrides:
        # Hydra's override grammar takes no '=' inside a value such as hydra.run.dir.
        short = [o.split("=", 1)[0].rsplit(".", 1)[-1] + "_" + o.split("=", 1)[-1] for o in overrides]
        name += "-" + re.sub(r"[^\w.-]+", "_", "_".join(short))
    if teacher and teacher != TEACHERS[row]:
        overrides = [*overrides, *TEACHER_SWITCH[row, teacher]]
    if seed and row not in TEACHER_ROWS:  # seed 0 is the configs' own
        overrides, name = [*overrides, f"seed={seed}"], f"{name}-seed{seed}"
    extra = [f"model.teacher_ckpt={out / teacher / 'checkpoints/last.ckpt'}"] if teacher else []
    return out / name, overrides, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/digits_quality")
    parser.add_argument("--rows", default="edm,cd,ct,ict,ect")
    parser.add_argument("--score-only", action="store_true", help="score the checkpoints already in --out")
    parser.add_argument("--no-search", action="store_true", help="skip the two-step midpoint search")
    parser.add_argument("--set", nargs="*", default=[], help="overrides as row:key=value, e.g. ct:model.lr=1e-3")
    parser.add_argument("--study", default="budgets", help="the table of docs/results.md the rows belong to")
    parser.add_argument("--setting", help="the rows' name in that table (default: the method and its overrides)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave benchmarks/results/ as it is")
    parser.add_argument("--teacher", nargs="*", default=[], help="row=teacher row, e.g. sct=edm (default: TEACHERS)")
    parser.add_argument("--seed", type=int, help="the students' seed (teachers keep theirs); each seed its own run")
    args = parser.parse_args()
    teachers = {**TEACHERS, **dict(s.split("=", 1) for s in args.teacher)}
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    reference = to_uint8(digits_tensor(16)[0])
    results = []
    for row in args.rows.split(","):
        experiment, label, samplings = ROWS[row]
        overrides = [s.split(":", 1)[1] for s in args.set if s.startswith(f"{row}:")]
        run, overrides, extra = plan(row, overrides, teachers.get(row), args.seed, args.out)
        if args.score_only:
            ckpt, seconds = run / "checkpoints/last.ckpt", None
        else:
            ckpt, seconds = train(experiment, run, [*overrides, *extra])
        if row not in TEACHER_ROWS and not args.no_search:
            how, found = searched_two_step(ckpt, reference)
            samplings = [*samplings, ("2 steps, searched midpoint", how)]
        setting = args.setting or " ".join([label, *overrides])
        rows = []
        for name, how in samplings:
            rows.append(
                {
                    "study": args.study,
                    "setting": setting,
                    "sampling": name,
                    **score(ckpt, how, reference),
                    **(found if "searched" in name else {}),
                    "experiment": experiment,
                    "overrides": overrides,
                    "samples": reference.shape[0],
                    "train_seconds": seconds and round(seconds, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        if not args.no_record:  # row by row, so that a long run that stops keeps what it measured
            write_results.append("digits_quality", rows)
        results += rows
    if not args.no_record:
        write_results.PAGE.write_text(write_results.render())
    print("\n| setting | sampling | FID (digits classifier) | IS | train s |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['setting']} | {r['sampling']} | {r['fid']} | {r['is']} | {r['train_seconds']} |")


if __name__ == "__main__":
    main()
