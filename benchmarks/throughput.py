"""Training and sampling throughput of any experiment, printed as one JSON line.

    python benchmarks/throughput.py experiment=imagenet64_cd model/objective/distance=l2 [bench.batch=64]
        [bench.find_max_batch=true] [model.speed.compile=false ...any train.py override]

The experiment's own LightningModule trains through Lightning (precision plugin, optimiser, EMA and target
updates included) on synthetic data of its shape; optimiser steps are timed after ``bench.warmup`` untimed
ones, with the device synchronised at both ends. Then one-step and two-step sampling from the EMA weights is
timed at ``bench.sample_batch``. FLOPs per image come from ``torch.utils.flop_counter`` over one uncompiled
training step. CD without ``model.teacher_ckpt`` distils a randomly initialised teacher of the same network,
which costs the same. Settings are in conf/throughput.yaml; results go to stdout and ``bench.out``.
"""

import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from max_batch import largest_batch, out_of_memory  # noqa: E402

from cm_lightning.cli import register_resolvers, user_errors  # noqa: E402
from cm_lightning.training import needs_teacher  # noqa: E402

register_resolvers()


class Synthetic(torch.utils.data.IterableDataset):
    """The same batch forever: the benchmark measures the step, not the input pipeline."""

    def __init__(self, batch: int, net):
        self.x = torch.randn(batch, net.in_channels, net.image_size, net.image_size).clamp(-1, 1)
        self.y = torch.randint(0, max(1, getattr(net, "num_classes", 0)), (batch,))

    def __iter__(self):
        while True:
            yield self.x, self.y


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Wall time of optimiser steps warmup+1 .. warmup+steps, and the peak memory over them."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.seconds = warmup, steps, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            synchronize(pl_module.device)
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup + self.steps:
            synchronize(pl_module.device)
            self.seconds = time.perf_counter() - self.start


def teacher_for(cfg: DictConfig, workdir: Path) -> None:
    """A CD/ECT config without a teacher gets a randomly initialised one of the same network, saved as a
    plain state dict the way the authors' teachers are."""
    if needs_teacher(cfg.model) and cfg.model.teacher_ckpt is None:
        path = workdir / "edm_random_teacher.pt"
        if not path.exists():
            torch.save(instantiate(cfg.net).state_dict(), path)
        with open_dict(cfg):
            cfg.model.teacher_ckpt = str(path)


def count_flops(model, batch: int, device: torch.device) -> tuple[float, float]:
    """FLOPs per image of one training step (every network evaluation, forward and backward) and of one
    forward pass of the network. Attention runs as explicit matrix products here: the flop counter knows
    the CUDA flash kernels but not the CPU's, and the count must not depend on the device."""
    data = Synthetic(batch, model.net)
    x, y = data.x.to(device), data.y.to(device)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as step:
            model.losses(x, y, 0)[0].mean().backward()
        model.net.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as forward, torch.no_grad():
            model.parameterisation(model.net, x, torch.ones(batch, device=device), model.labels_for(y))
    return step.get_total_flops() / batch, forward.get_total_flops() / batch


def build_trainer(cfg: DictConfig, steps: int, callbacks, workdir: Path) -> L.Trainer:
    return L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        max_steps=steps,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=workdir,
    )


def train_run(cfg: DictConfig, batch: int, warmup: int, steps: int, workdir: Path, flops: bool = False):
    """(module on the training device, seconds for the timed steps, peak GiB, FLOPs per image or None) of a fresh
    model."""
    torch._dynamo.reset()
    model = instantiate(cfg.model)
    timer = StepTimer(warmup, steps)
    trainer = build_trainer(cfg, warmup + steps, [timer], workdir)
    device = trainer.strategy.root_device
    counted = count_flops(model.to(device), cfg.bench.flop_batch, device) if flops else None
    loader = torch.utils.data.DataLoader(Synthetic(batch, model.net), batch_size=None, pin_memory=device.type == "cuda")
    trainer.fit(model, train_dataloaders=loader)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    # Lightning's teardown leaves the module on the CPU: sampling (and the device's name) would be timed there.
    return model.to(device), timer.seconds, peak, counted


def max_batch(cfg: DictConfig, start: int, start_run: tuple[float, float], workdir: Path) -> tuple[int, float, float]:
    """(the largest per-device batch that trains within ``bench.memory_gib``, its training seconds and peak GiB),
    given the main run's (seconds, peak GiB) at ``start``. Each probe is a full timed run, so the answer needs
    no run of its own."""
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.bench.memory_gib * 2**30 / total), device)
    runs = {start: start_run}

    def peak_at(batch: int) -> float | None:
        try:
            _, seconds, peak, _ = train_run(cfg, batch, cfg.bench.warmup, cfg.bench.steps, workdir)
        except Exception as error:  # noqa: BLE001 - only running out of memory means "does not fit"
            if not out_of_memory(error):
                raise
            return None
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        runs[batch] = (seconds, peak)
        return peak

    largest = largest_batch(peak_at, start, start_run[1], min(cfg.bench.memory_gib, total / 2**30))
    return largest, *runs[largest]


def time_sampling(model, cfg: DictConfig, device: torch.device) -> dict:
    """Images/s of the EMA weights' sampler per step count, compiled in ``sample_compile_mode``."""
    sampler = model.sampler().speed_up(model.speed, cfg.trainer.precision, device)
    rates = {}
    for steps in cfg.bench.sample_steps:
        how = {"steps": steps} if sampler.parameterisation.few_step else {"steps": steps, "solver": "heun"}

        def call(seed: int, how=how):
            sampler(cfg.bench.sample_batch, seed=seed, device=device, **how)

        for seed in range(3):
            call(seed)
        synchronize(device)
        start = time.perf_counter()
        for seed in range(cfg.bench.sample_repeats):
            call(seed)
        synchronize(device)
        rates[str(steps)] = sig(cfg.bench.sample_batch * cfg.bench.sample_repeats / (time.perf_counter() - start))
    return rates


def sig(x: float) -> float:
    return float(f"{x:.4g}")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


@hydra.main(config_path="../conf", config_name="throughput", version_base="1.3")
@user_errors
def main(cfg: DictConfig) -> None:
    L.seed_everything(cfg.seed)
    bench = cfg.bench
    if bench.find_max_batch and not torch.cuda.is_available():
        raise SystemExit("error: bench.find_max_batch=true needs a CUDA device; drop it on the CPU")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        teacher_for(cfg, workdir)
        try:
            model, seconds, peak, (step_flops, forward_flops) = train_run(
                cfg, bench.batch, bench.warmup, bench.steps, workdir, flops=True
            )
        except Exception as error:  # noqa: BLE001 - re-raised unless it is running out of memory
            if not out_of_memory(error):
                raise
            raise SystemExit(
                f"error: bench.batch={bench.batch} does not train within the device's memory; "
                "lower bench.batch or add net.use_checkpoint=true"
            ) from error
        device = model.device
        images_per_s = bench.batch * bench.steps / seconds
        result = {
            "device": device_name(device),
            "experiment": cfg.run_name,
            "batch_per_device": bench.batch,
            "train_images_per_s": sig(images_per_s),
            "train_tflops": sig(step_flops * images_per_s / 1e12),
            "train_gflop_per_image": sig(step_flops / 1e9),
            "net_forward_gflop_per_image": sig(forward_flops / 1e9),
            "peak_memory_gib": None if peak is None else round(peak, 2),
            # The published sizes count the network; an objective's own weights (EDM2's uncertainty head, sCM's
            # weighting) are counted apart.
            "net_parameters": sum(p.numel() for p in model.net.parameters()),
            "objective_parameters": sum(p.numel() for p in model.objective.parameters() if p.requires_grad),
            "sample_batch": bench.sample_batch,
            "sample_images_per_s": time_sampling(model, cfg, device),
        }
        speed = model.speed  # resolved for the device in setup()
        del model
        gc.collect()
        if bench.find_max_batch:
            largest, max_seconds, max_peak = max_batch(cfg, bench.batch, (seconds, peak), workdir)
            result.update(
                max_batch=largest,
                max_batch_images_per_s=sig(largest * bench.steps / max_seconds),
                max_batch_peak_memory_gib=round(max_peak, 2),
                memory_cap_gib=bench.memory_gib,
            )
    result["settings"] = {
        "precision": cfg.trainer.precision,
        "channels_last": speed.channels_last,
        "compile": speed.compile,
        "compile_mode": speed.compile_mode,
        "sample_compile_mode": speed.sample_compile_mode,
        "fused_optimizer": speed.fused_optimizer,
        "frozen_dtype": speed.frozen_dtype,
        "activation_checkpointing": bool(cfg.net.get("use_checkpoint", False)),
        "objective": cfg.model.objective._target_.rsplit(".", 1)[-1],
        "distance": (cfg.model.objective.get("distance") or {}).get("_target_", "").rsplit(".", 1)[-1] or None,
        "optimizer": cfg.model.optimizer._target_,
        "torch": torch.__version__,
        "steps_timed": bench.steps,
        "warmup": bench.warmup,
    }
    line = json.dumps(result)
    print(line, flush=True)
    Path(bench.out).parent.mkdir(parents=True, exist_ok=True)
    Path(bench.out).write_text(line + "\n")


if __name__ == "__main__":
    main()
