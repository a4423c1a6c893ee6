"""Evaluate a checkpoint: ``python evaluate.py ckpt=PATH [task=sample]`` (see conf/evaluate.yaml)."""

import hydra

from cm_lightning.cli import register_resolvers, user_errors
from cm_lightning.evaluation import evaluate

register_resolvers()


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
@user_errors
def main(cfg):
    evaluate(cfg)


if __name__ == "__main__":
    main()
