"""The checkpoint's inner layout has one owner (cm_lightning/checkpoint.py): what a run writes, how older
layouts read back as today's, and what editing asks of it."""

import pytest
import torch

from cm_lightning.checkpoint import META_KEY, upgrade, weights
from cm_lightning.errors import ConfigError
from cm_lightning.loading import read_checkpoint
from cm_lightning.tasks.editing import run_method


def test_a_run_stores_its_method_facts_as_its_objective_states_them(cd_run, edm_run):
    cd = read_checkpoint(cd_run / "checkpoints/last.ckpt")
    assert cd[META_KEY]["method"] == {"family": "cd", "num_scales": 18}  # digits_cd: FixedCurriculum(18)
    assert run_method(cd) == ("cd", 18)
    assert read_checkpoint(edm_run / "checkpoints/last.ckpt")[META_KEY]["method"] is None


def test_weights_are_the_ema_the_run_samples_with(cd_run):
    ckpt = read_checkpoint(cd_run / "checkpoints/last.ckpt")
    ema = weights(ckpt)
    assert ema and all(torch.equal(v, ckpt["state_dict"][f"ema.0.{k}"]) for k, v in ema.items())
    assert weights(ckpt, "net").keys() == ema.keys()


def test_the_layout_before_names_and_facts_upgrades_to_todays():
    old = {
        "config": {
            "model": {
                "target": {
                    "_target_": "cm_lightning.diffusion.targets.CDTarget",
                    "schedule": {"_target_": "cm_lightning.diffusion.karras.FixedSchedule", "num_scales": 40},
                }
            },
            "trainer": {"max_steps": 10},
        },
        "kind": "consistency",
        "precond": {"sigma_data": 0.5, "eps": 0.002, "noise_kind": "adm"},
        "grid": {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0},
    }
    new = upgrade(old)
    assert new["parameterisation"] == {"name": "karras", **old["precond"], **old["grid"]}
    assert "kind" not in new and "precond" not in new
    assert new["method"] == {"family": "cd", "num_scales": 40}
    assert new["config"]["model"]["target"]["_target_"] == "cm_lightning.diffusion.pair_rules.CDPairRule"
    assert upgrade(new) == new


@pytest.mark.parametrize("method", [{"family": "gan", "num_scales": 1}, {"family": "cd", "num_scales": -1}, "cd"])
def test_a_damaged_method_entry_stops_in_one_line(method, cd_run, tmp_path):
    ckpt = torch.load(cd_run / "checkpoints/last.ckpt", weights_only=True)
    ckpt[META_KEY]["method"] = method
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(ConfigError, match="its method .* is not a method family"):
        read_checkpoint(tmp_path / "bad.ckpt", "ckpt")
