"""iCT and ECT: the curriculum, index probabilities, weightings and r(t) against hand-computed values,
the target at r = 0, bad input, resuming a curriculum, and the published experiments composing."""

import csv
import functools
import math
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY
from helpers.builders import consistency_module, cpu_trainer, pair_outputs, randomise, tiny_net
from helpers.launch import run_script
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader, TensorDataset

from cm_lightning.diffusion.curricula import ECTCurriculum, ICTCurriculum
from cm_lightning.diffusion.distances import L2
from cm_lightning.diffusion.karras import karras_sigmas, lognormal_index_probs
from cm_lightning.diffusion.pair_rules import ECTPairRule, ICTPairRule, make_weighting
from cm_lightning.errors import ConfigError


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def build_error(node) -> str:
    """The message of the user error that instantiating ``node`` stops with (unwrapped from Hydra's)."""
    with pytest.raises(Exception) as info:
        instantiate(node)
    exc = info.value
    while exc.__cause__ is not None:
        exc = exc.__cause__
    assert isinstance(exc, ValueError), repr(exc)
    return str(exc)


# --- iCT curriculum and noise sampling --------------------------------------------------------------
def test_ict_curriculum_hand_computed():
    sched = ICTCurriculum(s0=10, s1=1280, total_steps=8000)
    # K' = floor(8000 / (log2 floor(1280 / 10) + 1)) = floor(8000 / 8) = 1000
    assert sched.steps_per_doubling == 1000
    assert [sched.num_scales(k) for k in (0, 999, 1000, 2000)] == [11, 11, 21, 41]
    assert sched.num_scales(7000) == sched.num_scales(8000) == sched.num_scales(10**9) == 1281  # capped at s1 + 1
    assert sched(1000) == (21, 0.0)  # no EMA target
    # s1 / s0 not a power of two: K' = floor(1000 / (log2 15 + 1)) = floor(203.79) = 203
    odd = ICTCurriculum(s0=10, s1=150, total_steps=1000)
    assert odd.steps_per_doubling == 203
    assert [odd.num_scales(k) for k in (202, 203, 609, 812)] == [11, 21, 81, 151]


def test_lognormal_index_probs_match_the_erf_formula():
    sigmas = karras_sigmas(5)
    probs = lognormal_index_probs(sigmas, -1.1, 2.0)
    cdf = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in sigmas.tolist()]
    mass = [b - a for a, b in zip(cdf, cdf[1:])]
    expected = torch.tensor([m / sum(mass) for m in mass])
    torch.testing.assert_close(probs, expected)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert lognormal_index_probs(karras_sigmas(1281)).sum().item() == pytest.approx(1.0, abs=1e-6)


def test_ict_target_draws_indices_with_those_probabilities():
    target = ICTPairRule(ICTCurriculum(s0=10, s1=10, total_steps=1))
    t, r = target.sample_levels(0, 40_000, torch.Generator().manual_seed(0))
    sigmas = karras_sigmas(11)
    n = torch.searchsorted(sigmas, r)
    assert torch.equal(sigmas[n + 1], t)
    freq = torch.bincount(n, minlength=10).float() / len(n)
    torch.testing.assert_close(freq, lognormal_index_probs(sigmas), atol=0.01, rtol=0)
    # Its weighting is 1 / (sigma_{n+1} - sigma_n).
    torch.testing.assert_close(target.weight(t, r), 1 / (sigmas[n + 1] - sigmas[n]))
    assert target.uses_online_target  # mu = 0: no EMA target; a non-zero mu ablates that
    assert not ICTPairRule(ICTCurriculum(mu=0.9)).uses_online_target


def test_weightings_hand_computed():
    t, r = torch.tensor([0.5, 2.0]), torch.tensor([0.0, 1.5])
    torch.testing.assert_close(make_weighting("inverse_gap")(t, r), torch.tensor([2.0, 2.0]))
    # 1/t^2 + 1/sigma_data^2 with sigma_data = 0.5: 4 + 4 and 0.25 + 4
    torch.testing.assert_close(make_weighting("inverse_square", 0.5)(t, r), torch.tensor([8.0, 4.25]))
    torch.testing.assert_close(make_weighting("uniform")(t, r), torch.ones(2))
    with pytest.raises(ConfigError, match="'bogus'"):
        make_weighting("bogus")


def test_ict_pseudo_huber_is_per_image_with_the_published_c():
    distance = instantiate(compose_cfg("experiment=digits_ict").model.objective.distance)
    x, y = torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16)
    y[0] += 0.5  # ||x - y||^2 = 256 * 0.25 = 64
    c = 0.00054 * math.sqrt(256)
    torch.testing.assert_close(distance(x, y), torch.tensor([math.sqrt(64 + c**2) - c, 0.0]))


# --- ECT ----------------------------------------------------------------------------------------------
def test_ect_r_of_t_hand_computed():
    sched = ECTCurriculum(q=2, k=8, b=1, double_every=100)
    t = torch.tensor([0.0, 0.01, 1.0, 20.0], dtype=torch.float64)
    # n(t) = 1 + 8 sigmoid(-t); r = max(0, t (1 - n(t) / 2^(s+1)))
    # t = 0.01: n = 4.98, so 1 - n/2 and 1 - n/4 are negative: r = 0 at stages 0 and 1.
    # t = 1: n = 1 + 8 * 0.2689414 = 3.1515313; stage 0: 1 - 1.5758 < 0 -> 0; stage 1: 1 - 0.7878828 = 0.2121172
    # t = 20: n = 1 + 8 * 2.06e-9; stage 0: 20 (1 - 1/2) = 10; stage 1: 20 (1 - 1/4) = 15
    torch.testing.assert_close(sched.r_of_t(t, 0), torch.tensor([0.0, 0.0, 0.0, 10.0], dtype=torch.float64))
    torch.testing.assert_close(sched.r_of_t(t, 1), torch.tensor([0.0, 0.0, 0.2121172, 15.0], dtype=torch.float64))
    assert [sched.stage(k) for k in (0, 99, 100, 250)] == [0, 0, 1, 2]


def test_ect_levels_stay_on_the_consistency_function_domain():
    target = ECTPairRule(ECTCurriculum(double_every=10))
    assert target.state(25) == {"stage": 2, "mu": 0.0}
    t, r = target.sample_levels(25, 20_000, torch.Generator().manual_seed(0))
    assert t.min() >= 0.002 and t.max() <= 80.0
    assert torch.all(r < t) and torch.all((r == 0) | (r >= 0.002))
    assert (r == 0).any() and (r > 0).any()
    # ln t ~ N(-1.1, 2^2) apart from the clamped tails
    torch.testing.assert_close(t.log().median(), torch.tensor(-1.1), atol=0.05, rtol=0)


def ect_module(net):
    return consistency_module(
        net,
        ECTPairRule(ECTCurriculum(double_every=1)),
        L2(),
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
        ema_rates=(0.9,),
    )


def test_r_zero_makes_the_target_exactly_x0():
    torch.manual_seed(0)
    module = ect_module(randomise(tiny_net()))
    assert module.target_net is None  # the online network is the target
    module.objective.pair.sample_levels = lambda step, num, g: (
        torch.full((num,), 1.0),
        torch.tensor([0.0, 0.5, 0.0, 0.5]),
    )
    x0 = torch.randn(4, 1, 8, 8)
    _, target, _, r = pair_outputs(module, x0)
    assert torch.equal(target[r == 0], x0[r == 0])
    assert not torch.allclose(target[r > 0], x0[r > 0])


def test_ect_trains_and_logs_stage_mu_and_weight():
    torch.manual_seed(0)
    module = ect_module(randomise(tiny_net()))
    data = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)), batch_size=4)
    trainer = cpu_trainer(max_steps=3)
    trainer.fit(module, data)
    logged = trainer.callback_metrics
    assert logged["train/stage"] == 2 and logged["train/mu"] == 0 and logged["train/weight"] > 0
    assert torch.isfinite(logged["train/loss"])


def test_ect_starts_from_the_teacher(edm_run):
    cfg = compose_cfg("experiment=digits_ect", f"model.teacher_ckpt={edm_run / 'checkpoints/last.ckpt'}", *TINY)
    module = instantiate(cfg.model)
    teacher = torch.load(edm_run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    for key, value in module.net.state_dict().items():
        assert torch.equal(value, teacher[f"ema.0.{key}"])
    assert module.target_net is None


# --- bad input ------------------------------------------------------------------------------------------
def test_ect_without_teacher_stops_before_training(tmp_path):
    proc = run_script(
        "train.py", "experiment=digits_ect", *TINY, "logger=none", f"hydra.run.dir={tmp_path}", check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.teacher_ckpt is not set" in proc.stderr and "ECT" in proc.stderr
    assert "Epoch 0" not in proc.stdout + proc.stderr


def test_ect_with_another_architecture(edm_run):
    cfg = compose_cfg(
        "experiment=digits_ect",
        f"model.teacher_ckpt={edm_run / 'checkpoints/last.ckpt'}",
        *TINY,
        "net.model_channels=32",
    )
    assert "does not match the configured network" in build_error(cfg.model)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.objective.pair.curriculum.s0=2000", "s0=2000, s1=80"),
        ("model.objective.pair.p_std=0", "p_std=0"),
        ("model.objective.pair.p_std=-1.5", "p_std=-1.5"),
        ("model.objective.distance.c_scale=0", "c_scale=0"),
        ("model.objective.pair.index_sampling=normal", "'normal'"),
    ],
)
def test_ict_bad_values_name_themselves(override, message):
    cfg = compose_cfg("experiment=digits_ict", override)
    assert message in build_error(cfg.model.objective.distance if "distance" in override else cfg.model.objective.pair)


def test_ect_bad_values_name_themselves():
    with pytest.raises(ConfigError, match="p_std=0"):
        ECTPairRule(ECTCurriculum(), p_std=0)
    with pytest.raises(ConfigError, match="q=1"):
        ECTCurriculum(q=1)
    with pytest.raises(ConfigError, match="double_every=0"):
        ECTCurriculum(double_every=0)


# --- resume and the published experiments ------------------------------------------------------------------
def logged_num_scales(run: Path) -> list[float]:
    return [
        float(r["train/num_scales"]) for r in csv.DictReader(open(run / "csv/metrics.csv")) if r.get("train/num_scales")
    ]


def test_ict_curriculum_survives_resume(tmp_path):
    # s0 = 10, s1 = 80, K = 8: K' = floor(8 / (log2 8 + 1)) = 2, so N = 11, 11, 21, 21, 41, 41, 81, 81.
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    common = [
        "experiment=digits_ict",
        *TINY,
        "model.objective.pair.curriculum.s1=80",
        "model.objective.pair.curriculum.total_steps=8",
        "logger=csv",
    ]
    run_script("train.py", *common, "trainer.max_steps=4", f"hydra.run.dir={first}")
    run_script(
        "train.py",
        *common,
        "trainer.max_steps=8",
        f"ckpt_path={first / 'checkpoints/last.ckpt'}",
        f"hydra.run.dir={resumed}",
    )
    assert logged_num_scales(first) == [11, 11, 21, 21]
    assert logged_num_scales(resumed) == [41, 41, 81, 81]  # steps 4 to 7
    ckpt = torch.load(resumed / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8
    assert not any(k.startswith("target_net.") for k in ckpt["state_dict"])  # no EMA target to save


def test_cifar10_experiments_compose_with_the_published_settings():
    ict = compose_cfg("experiment=cifar10_ict")
    assert ict.data.batch_size == 1024 and ict.net.dropout == 0.3 and ict.model.optimizer.lr == 1e-4
    target = instantiate(ict.model.objective.pair)
    assert isinstance(target, ICTPairRule) and target.uses_online_target
    assert target.curriculum.total_steps == 400_000 and target.state(0) == {"num_scales": 11, "mu": 0.0}
    assert target.state(400_000)["num_scales"] == 1281
    assert instantiate(ict.model.objective.distance).c(torch.zeros(1, 3, 32, 32)) == pytest.approx(
        0.00054 * math.sqrt(3072)
    )

    ect = compose_cfg("experiment=cifar10_ect")
    assert ect.data.batch_size == 128 and ect.net.dropout == 0.2 and ect.model.init_from_teacher
    assert list(ect.callbacks.sample_grid.sigmas) == [[80.0, 0.821]]
    target = instantiate(ect.model.objective.pair)
    assert isinstance(target, ECTPairRule) and target.state(199_999) == {"stage": 7, "mu": 0.0}
    net = instantiate(ict.net)
    assert net.image_size == 32 and type(net).__name__ == "NCSNpp" and ict.net.embedding_scale == 0.02  # as the paper
