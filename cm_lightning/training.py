"""``python train.py``: build everything from the Hydra config, check it, and fit."""

import logging
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cm_lightning.errors import ConfigError

log = logging.getLogger(__name__)


def check_data_matches_net(data, net) -> None:
    """The network must take the dataset's images and labels; say which value to change otherwise."""
    for attr, data_attr in (("image_size", "image_size"), ("in_channels", "channels")):
        if getattr(net, attr) != getattr(data, data_attr):
            raise ConfigError(
                f"net.{attr}={getattr(net, attr)} but data.{data_attr}={getattr(data, data_attr)}; "
                f"set net.{attr}={getattr(data, data_attr)} (or leave it to its default interpolation)"
            )
    net_classes = getattr(net, "num_classes", 0)
    if net_classes and net_classes != data.num_classes:
        raise ConfigError(
            f"net.num_classes={net_classes} but the data has {data.num_classes} classes; "
            f"set net.num_classes={data.num_classes}, or 0 for an unconditional model"
        )


def build(cfg: DictConfig):
    """Data, model, callbacks, loggers and trainer, each with ``hydra.utils.instantiate``."""
    data = instantiate(cfg.data)
    model = instantiate(cfg.model)
    check_data_matches_net(data, model.net)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return data, model, trainer


def train(cfg: DictConfig) -> Path:
    L.seed_everything(cfg.seed, workers=True)
    data, model, trainer = build(cfg)
    trainer.fit(model, datamodule=data, ckpt_path=cfg.get("ckpt_path"))
    return Path(trainer.default_root_dir)
