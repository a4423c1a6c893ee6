"""``task=export``: the run's EMA network as a plain state dict, the format of the authors' files."""

import logging
from pathlib import Path

from omegaconf import DictConfig

from cm_lightning.loading import export_state_dict, read_once
from cm_lightning.runtime.run_dir import refuse_existing

log = logging.getLogger(__name__)


def export_task(cfg: DictConfig) -> list[Path]:
    out = cfg.export_to or Path(cfg.out_dir) / "model_ema.pt"
    refuse_existing(out, "export_to", cfg.overwrite, "choose another export_to=...")
    out = export_state_dict(read_once(cfg.ckpt), cfg.ckpt, out, cfg.ema)
    log.info("wrote %s", out)
    return [out]
