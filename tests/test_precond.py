import math

import pytest
import torch
from helpers.builders import randomise, tiny_net

from cm_lightning.diffusion.parameterisation import c_noise
from cm_lightning.diffusion.precond import consistency_function, edm_denoiser, scalings


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return randomise(tiny_net())  # non-zero output layers, so that F is not trivially zero


def test_boundary_condition_is_exact(net):
    f = consistency_function(sigma_data=0.5, sigma_min=0.002)
    x = torch.randn(4, 1, 8, 8)
    out = f(net, x, torch.full((4,), 0.002))
    assert torch.equal(out, x)
    assert not torch.equal(f(net, x, torch.full((4,), 0.01)), x)


def test_scalings_match_formulas():
    sigma, sd, eps = torch.tensor([0.5, 3.0]), 0.5, 0.002
    c_skip, c_out, c_in = scalings(sigma, sd, eps)
    for i, s in enumerate(sigma.tolist()):
        assert c_skip[i].item() == pytest.approx(sd**2 / ((s - eps) ** 2 + sd**2), rel=1e-6)
        assert c_out[i].item() == pytest.approx((s - eps) * sd / math.sqrt(s**2 + sd**2), rel=1e-6)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-6)


def test_edm_denoiser_uses_eps_zero(net):
    d = edm_denoiser(0.5)
    assert d.eps == 0.0
    c_skip, c_out, _ = scalings(torch.tensor(2.0), 0.5, 0.0)
    assert c_skip.item() == pytest.approx(0.25 / 4.25)
    assert c_out.item() == pytest.approx(2 * 0.5 / math.sqrt(4.25))


def test_network_sees_c_noise_not_sigma():
    seen = {}

    def fake_net(x, noise, labels):
        seen["noise"], seen["x"] = noise, x
        return torch.zeros_like(x)

    f = consistency_function()
    x = torch.ones(2, 1, 4, 4)
    f(fake_net, x, torch.tensor([1.0, 80.0]))
    torch.testing.assert_close(seen["noise"], 250 * torch.log(torch.tensor([1.0, 80.0]) + 1e-44))
    torch.testing.assert_close(seen["x"][1], x[1] / math.sqrt(80.0**2 + 0.25))
    assert c_noise(torch.tensor([1.0]), "edm").item() == 0.0
    with pytest.raises(ValueError, match="'bogus'"):
        c_noise(torch.tensor([1.0]), "bogus")


def test_default_multistep_levels():
    assert consistency_function().levels(1) == [pytest.approx(80.0)]
    two = consistency_function().levels(2)
    assert two[0] == pytest.approx(80.0) and 0.002 < two[1] < 80.0
