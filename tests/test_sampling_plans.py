"""The sampler's plans (naming, validation, the ts= conversion, the teacher default), the one seeded batch loop
shared by evaluate.py, the metrics and editing, and the Fidelity a metrics config names."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cm_lightning.diffusion.precond import consistency_function, edm_denoiser
from cm_lightning.diffusion.sampling import TEACHER_STEPS, check_decreasing, sigmas_from_indices
from cm_lightning.errors import ConfigError
from cm_lightning.metrics.fidelity import SETTINGS, Fidelity
from cm_lightning.metrics.sharding import sample_shard, seeded_chunks, shard_chunks
from cm_lightning.sampler import Sampler
from cm_lightning.tasks.common import sample_batched

ROOT = Path(__file__).resolve().parents[1]


def test_seeded_chunks_cover_num_once_with_seed_plus_chunk_index():
    chunks = list(seeded_chunks(10, 4, seed=7))
    assert chunks == [(0, 4, 7), (4, 4, 8), (8, 2, 9)]
    # Any split over ranks draws the same chunks with the same seeds, in order.
    for world in (1, 2, 3, 5):
        split = [c for r in range(world) for c in seeded_chunks(10, 4, 7, shard_chunks(10, 4, r, world))]
        assert split == chunks
    assert list(seeded_chunks(0, 4, 0)) == []


class Seeded:
    """A sampler whose images are the seed it was called with, so a batch's seeds can be read back."""

    pixel_shape = (1, 1, 1)

    def __call__(self, num, seed, device, labels=None, **how):
        return torch.full((num, 1, 1, 1), seed / 100.0), None


def test_evaluate_and_metrics_draw_the_same_chunks():
    batched, _ = sample_batched(Seeded(), 7, 3, seed=5, device="cpu")
    assert batched.flatten().mul(100).round().tolist() == [5, 5, 5, 6, 6, 6, 7]
    ranks = [sample_shard(Seeded(), 7, 3, 5, "cpu", r, 2) for r in range(2)]
    expected = ((torch.tensor([5.0] * 3 + [6.0] * 3 + [7.0]) / 100 + 1) * 127.5).round().to(torch.uint8)
    assert torch.cat(ranks).flatten().tolist() == expected.tolist()


def test_the_teacher_default_is_written_once():
    teacher, student = Sampler(None, edm_denoiser()), Sampler(None, consistency_function())
    assert teacher.requested(model="ckpt=x") == {f"{TEACHER_STEPS}step": dict(steps=TEACHER_STEPS, solver="heun")}
    assert teacher.plans() == teacher.requested(model="ckpt=x")
    assert student.requested(steps=[3]) == {"3step": dict(steps=3)}
    # The callbacks' null teacher_steps is that default too.
    callbacks = OmegaConf.load(ROOT / "conf/callbacks/default.yaml")
    assert callbacks.sample_grid.teacher_steps is None and callbacks.metrics.teacher_steps is None


def test_requested_plans_convert_ts_and_check_levels():
    student = Sampler(None, consistency_function())
    grid = student.parameterisation.grid
    assert student.requested(ts=[0, 22, 39], ts_num_scales=40) == {
        "ts0-22-39": dict(sigmas=sigmas_from_indices([0, 22, 39], 40, **grid))
    }
    assert student.requested(sigmas=[80.0, 0.8]) == {"sigmas": dict(sigmas=[80.0, 0.8])}
    with pytest.raises(ConfigError, match=r"sigmas=\[120.0, 1.0\] leaves the model's noise range"):
        student.requested(sigmas=[120.0, 1.0])
    with pytest.raises(ConfigError, match="solver=euler applies to diffusion teachers, but ckpt=x"):
        student.requested(solver="euler", model="ckpt=x")
    with pytest.raises(ConfigError, match="ckpt=x is a diffusion denoiser"):
        Sampler(None, edm_denoiser()).requested(sigmas=[80.0], model="ckpt=x")
    # Without a noise range only the order and sign are checked (the sample grid's levels).
    assert check_decreasing([500.0, 1.0]) == [500.0, 1.0]


def test_fidelity_is_built_from_a_metrics_config():
    m = OmegaConf.load(ROOT / "conf/metrics/default.yaml")
    assert set(SETTINGS) <= set(m)
    fidelity = Fidelity.from_config(OmegaConf.merge(m, {"feature_extractor": "digits-classifier", "kid": True}))
    assert fidelity.extractor_name == "digits-classifier" and fidelity.kid and fidelity.kid_subset_size == 1000
