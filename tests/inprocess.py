"""The entry points' configs composed and run inside the test process: what ``python train.py ...`` and
``python evaluate.py ...`` do, minus the seconds each new interpreter spends importing torch and Lightning."""

from pathlib import Path

from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from cm_lightning.cli import register_resolvers
from cm_lightning.tasks.dispatch import evaluate
from cm_lightning.training import train


def compose_run(config_name: str, overrides, run_dir: Path) -> DictConfig:
    """The composed config with ``${hydra:...}`` resolving as in a run whose output directory is ``run_dir``."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def train_here(overrides, run_dir: Path) -> Path:
    return train(compose_run("train", overrides, run_dir))


def evaluate_here(overrides, run_dir: Path):
    return evaluate(compose_run("evaluate", overrides, run_dir))
