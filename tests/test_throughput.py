"""benchmarks/throughput.py: its JSON line, its FLOP count, and the search for the largest batch."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, TINY
from helpers.launch import run_script
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(ROOT / "benchmarks"))
from max_batch import largest_batch, out_of_memory  # noqa: E402


def forward_gflop(*overrides: str) -> float:
    """GFLOP per image of one forward of an experiment's network, counted on the meta device (no compute,
    attention as explicit matrix products)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    with torch.device("meta"):
        net = instantiate(cfg.net)
        x = torch.empty(1, net.in_channels, net.image_size, net.image_size)
        labels = torch.zeros(1, dtype=torch.long) if net.num_classes else None
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(x, torch.ones(1), labels)
    return counter.get_total_flops() / 1e9


def net_parameters(*overrides: str) -> int:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    with torch.device("meta"):
        return sum(p.numel() for p in instantiate(cfg.net).parameters())


def test_imagenet64_network_is_the_one_the_authors_numbers_are_for():
    # The reference convention: the ImageNet-64 U-Net, 219 GFLOP per image forward; TFLOP/s compare only then.
    assert forward_gflop("experiment=imagenet64_cd") == pytest.approx(219.3, abs=0.1)


def test_throughput_benchmark_prints_one_json_line(tmp_path):
    out = tmp_path / "throughput.json"
    proc = run_script(
        "benchmarks/throughput.py",
        "experiment=digits_cd",
        *TINY,
        "bench.batch=8",
        "bench.steps=2",
        "bench.warmup=1",
        "bench.sample_batch=8",
        "bench.sample_repeats=1",
        f"bench.out={out}",
        f"hydra.run.dir={tmp_path}",
    )
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line == json.loads(out.read_text())
    assert line["experiment"] == "digits_cd" and line["batch_per_device"] == 8 and "CPU" in line["device"]
    assert line["train_images_per_s"] > 0 and line["train_tflops"] > 0
    assert line["net_parameters"] == net_parameters("experiment=digits_cd", *TINY) and line["objective_parameters"] == 0
    # The CPU's attention kernel is invisible to the flop counter; the benchmark counts it all the same.
    assert line["net_forward_gflop_per_image"] == pytest.approx(forward_gflop("experiment=digits_cd", *TINY), rel=1e-3)
    # Student forward + backward (3 forwards), two Heun evaluations of the teacher and the target's forward.
    assert line["train_gflop_per_image"] == pytest.approx(6 * line["net_forward_gflop_per_image"], rel=0.05)
    assert set(line["sample_images_per_s"]) == {"1", "2"}
    assert line["settings"]["precision"] == "32-true" and line["settings"]["compile"] is False


def test_max_batch_search_needs_cuda(tmp_path):
    proc = run_script(
        "benchmarks/throughput.py",
        "experiment=digits_cd",
        "bench.find_max_batch=true",
        f"hydra.run.dir={tmp_path}",
        check=False,
    )
    assert proc.returncode != 0 and "bench.find_max_batch=true needs a CUDA device" in proc.stderr


def affine(fixed: float, per_image: float):
    return lambda b: fixed + per_image * b


MEMORY = {
    "affine": affine(10.0, 0.1875),  # 22 GiB at 64
    "steep": affine(10.0, 0.5),  # 128 does not fit under 60 GiB
    "concave": lambda b: 10.0 + 2.0 * math.sqrt(b),  # the linear fit underestimates what fits
    "convex": lambda b: 10.0 + 0.1 * b + 0.0004 * b * b,  # and here overestimates it
    "nothing_larger": lambda b: 20.0 if b <= 64 else 1e9,
}


@pytest.mark.parametrize("memory", sorted(MEMORY))
@pytest.mark.parametrize("start", [64, 12])
@pytest.mark.parametrize("cap, usable", [(60.0, 60.0), (78.0, 78.0), (80.0, 76.5)])
def test_largest_batch_is_the_largest_multiple_of_8_that_fits(memory, start, cap, usable):
    # usable < cap: an 80 GB cap on a card whose allocator runs out first (CUDA context, fragmentation).
    peak = MEMORY[memory]
    calls = []

    def peak_at(batch):
        calls.append(batch)
        return peak(batch) if peak(batch) <= usable else None

    got = largest_batch(peak_at, start, peak(start), cap)
    fitting = [b for b in range(8, 4096, 8) if peak(b) <= usable]
    assert got == max([start, *fitting])
    assert len(calls) == len(set(calls)) and start not in calls  # every probe is a compiled run: none twice
    if memory == "affine":
        # twice the start, the prediction, and the next multiple of 8 above it (below it, when the card
        # holds less than the cap)
        assert len(calls) <= (3 if usable == cap else 5)


def test_out_of_memory_is_told_from_other_errors():
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert out_of_memory(oom)
    assert out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    try:
        try:
            raise oom
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("BackendCompilerFailed: backend='inductor' raised an error") from inner
    except RuntimeError as wrapped:
        assert out_of_memory(wrapped)
    assert not out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not out_of_memory(ValueError("bench.batch must be positive"))


def test_gpu_suite_script_appends_one_line_per_run(tmp_path):
    # benchmarks/gpu.sh is what a GPU session runs as is: its benchmark runs, shrunk here by EXTRA to a tiny net.
    tiny = " ".join(
        [
            "net.model_channels=16",
            "net.channel_mult=[1,2]",
            "net.attention_resolutions=[32]",
            "net.num_head_channels=16",
            "bench.batch=2",
            "bench.steps=1",
            "bench.warmup=1",
            "bench.flop_batch=1",
            "bench.sample_batch=2",
            "bench.sample_repeats=1",
        ]
    )
    env = {
        **os.environ,
        "DIR": str(tmp_path),
        "EXTRA": tiny,
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu.sh"), "cd", "ct", "sct"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (tmp_path / "log.txt").read_text()[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [line["experiment"] for line in lines] == ["imagenet64_cd", "imagenet64_ct", "imagenet64_sct"]
    assert all(line["batch_per_device"] == 2 for line in lines)
    assert [line["settings"]["distance"] for line in lines] == ["L2", "L2", None]
    assert lines[2]["settings"]["objective"] == "SCM" and lines[2]["train_gflop_per_image"] > 0

    unknown = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu.sh"), "imagenet"], env=env, capture_output=True, text=True
    )
    assert unknown.returncode == 2 and "choose from" in unknown.stderr
