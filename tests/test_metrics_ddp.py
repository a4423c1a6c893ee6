"""Metrics over several processes (gloo on the CPU): sharded sampling draws exactly the requested,
distinct samples, and every metric equals the single-process one on the same samples."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.builders import randomise, tiny_net
from helpers.launch import run_script

from cm_lightning.data.digits import DigitsDataModule
from cm_lightning.diffusion.precond import consistency_function
from cm_lightning.loading import sampler_from_checkpoint
from cm_lightning.metrics.fidelity import Fidelity
from cm_lightning.metrics.reference import ReferenceSource
from cm_lightning.metrics.sharding import gather_rows, sample_shard, sharded_features
from cm_lightning.sampler import Sampler

CASES = [(13, 4), (3, 4)]  # (num, batch): uneven shares; a single chunk leaves rank 0 without samples


def random_sampler() -> Sampler:
    torch.manual_seed(0)
    return Sampler(randomise(tiny_net(image_size=8), std=0.05), consistency_function())


def fidelity() -> Fidelity:
    return Fidelity("digits-classifier", fid=True, isc=True, prc=True)


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sampler, found = random_sampler(), {}
    for num, batch in CASES:
        images = gather_rows(sample_shard(sampler, num, batch, 7, "cpu", rank, world, steps=2))
        features = sharded_features(sampler, fidelity(), num, batch, 7, "cpu", steps=2)
        found[num] = (images, features)
    if rank == 0:
        torch.save(found, out)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_draw_exactly_the_samples_of_one(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path / "gathered.pt")), nprocs=2)
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=True)
    sampler, fid = random_sampler(), fidelity()
    reference = ReferenceSource.from_datamodule(DigitsDataModule(image_size=8)).load(fid, tmp_path, "cpu")
    for num, batch in CASES:
        images, features = gathered[num]
        single = sample_shard(sampler, num, batch, 7, "cpu", steps=2)
        assert images.shape[0] == num and torch.unique(images.flatten(1), dim=0).shape[0] == num
        assert torch.equal(images, single)
        single_features = sharded_features(sampler, fid, num, batch, 7, "cpu", steps=2)  # one process
        assert single_features.keys() == features.keys()
        for layer, value in single_features.items():
            torch.testing.assert_close(features[layer], value)
        if num >= 10:  # IS splits the samples in 10
            # Equal up to float rounding: thread counts differ between the processes and this one.
            multi, one = fid.compute(features, reference), fid.compute(single_features, reference)
            for key in ("fid", "is", "precision", "recall"):
                assert multi[key] == pytest.approx(one[key], rel=1e-6), key


def test_evaluate_on_two_devices_equals_one_process(edm_run, tmp_path):
    """The teacher, sampled with its 18-step Heun sampler over two processes (Lightning Fabric)."""
    ckpt = edm_run / "checkpoints/last.ckpt"
    run_script(
        "evaluate.py",
        "task=fid",
        f"ckpt={ckpt}",
        "num=12",
        "batch_size=5",
        "device=cpu",
        "trainer.devices=2",
        f"metrics.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path}",
    )
    result = json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert list(result) == ["18step"] and result["18step"]["nfe"] == 35

    sampler, fid = sampler_from_checkpoint(ckpt), Fidelity("digits-classifier")
    images = sample_shard(sampler, 12, 5, 0, "cpu", steps=18, solver="heun")
    reference = ReferenceSource.from_datamodule(DigitsDataModule()).load(fid, tmp_path / "cache", "cpu")
    expected = fid.compute(fid.features(images, "cpu"), reference)
    for key in ("fid", "is"):
        assert result["18step"][key] == pytest.approx(expected[key], rel=1e-6), key
