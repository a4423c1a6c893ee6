import math

import pytest
import torch

from cm_lightning.diffusion.curricula import CMCurriculum, FixedCurriculum
from cm_lightning.diffusion.karras import karras_sigmas
from cm_lightning.errors import ConfigError


def test_karras_endpoints_and_spacing():
    s = karras_sigmas(18, 0.002, 80.0, 7.0).double()
    assert s[0] == torch.tensor(0.002, dtype=torch.float32).double()
    assert s[-1] == 80.0
    assert torch.all(s[1:] > s[:-1])
    # sigma^(1/rho) is evenly spaced between the endpoints' roots.
    roots = s.pow(1 / 7)
    step = (80.0 ** (1 / 7) - 0.002 ** (1 / 7)) / 17
    torch.testing.assert_close(
        roots[1:] - roots[:-1], torch.full((17,), step, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )


def test_karras_point_by_formula():
    i, n = 5, 40  # sigma_6 of 40, 1-based as in the paper
    expected = (0.002 ** (1 / 7) + i / (n - 1) * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    assert karras_sigmas(n)[i].item() == pytest.approx(expected, rel=1e-6)


def test_karras_needs_two_points():
    with pytest.raises(ValueError, match="N=1"):
        karras_sigmas(1)


def test_cm_curriculum_hand_computed():
    sched = CMCurriculum(s0=2, s1=150, mu0=0.9, total_steps=1000)
    # k = 0: ceil(sqrt(4) - 1) + 1 = 2, mu = exp(2 ln 0.9 / 2) = 0.9
    assert sched(0) == (2, pytest.approx(0.9))
    # k = K/2: sqrt(0.5 * (151^2 - 4) + 4) = sqrt(11402.5) = 106.78 -> ceil(105.78) + 1 = 107
    n, mu = sched(500)
    assert n == 107 and mu == pytest.approx(math.exp(2 * math.log(0.9) / 107))
    # k = K: sqrt(151^2) - 1 = 150 -> 151
    n, mu = sched(1000)
    assert n == 151 and mu == pytest.approx(0.9 ** (2 / 151))
    assert sched(5000)[0] == 151  # past K the curriculum stays at its end


def test_fixed_curriculum_and_validation():
    assert FixedCurriculum(18, 0.95)(12345) == (18, 0.95)
    with pytest.raises(ValueError, match="mu=1.0"):
        FixedCurriculum(18, 1.0)
    with pytest.raises(ValueError, match="s0=5, s1=2"):
        CMCurriculum(s0=5, s1=2)


def _published_ct_curriculum(experiment: str) -> CMCurriculum:
    """The experiment's CT curriculum as composed (searched for, so it is found wherever the model nests it)."""
    from helpers import ROOT
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    def find(node):
        if isinstance(node, DictConfig):
            if str(node.get("_target_", "")).endswith("CMCurriculum"):
                return node
            return next((hit for hit in map(find, node.values()) if hit is not None), None)
        return None

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"])
    return instantiate(OmegaConf.to_container(find(cfg.model), resolve=True))


@pytest.mark.parametrize(
    "experiment, expected",
    [
        ("cifar10_ct", (0.81, 0.9, 0.9587)),
        ("imagenet64_ct", (0.9025, 0.95, 0.9855)),
        ("lsun_ct", (0.9025, 0.95, None)),
    ],
)
def test_published_ct_mu_follows_the_authors_code(experiment, expected):
    # The authors' create_ema_and_scales_fn: exp(s0 ln mu0 / (N(k) - 1)), values at k = 0, 1, 1000.
    sched = _published_ct_curriculum(experiment)
    assert sched.mu_divisor == "code"
    for k, mu in zip((0, 1, 1000), expected):
        if mu is not None:
            assert sched(k)[1] == pytest.approx(mu, abs=5e-5)


def test_mu_divisor_paper_is_the_default_and_names_are_checked():
    assert _published_ct_curriculum("digits_ct").mu_divisor == "paper"
    assert CMCurriculum(mu0=0.9, total_steps=800_000)(0)[1] == pytest.approx(0.9)
    with pytest.raises(ConfigError, match="mu_divisor='authors'.*'paper'.*'code'"):
        CMCurriculum(mu_divisor="authors")
    with pytest.raises(ConfigError, match="s0=1 with mu_divisor=code"):
        CMCurriculum(s0=1, mu_divisor="code")
