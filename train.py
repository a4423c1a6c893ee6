"""Train a model: ``python train.py experiment=digits_ct`` (see conf/ and README.md)."""

import hydra

from cm_lightning.cli import register_resolvers, user_errors
from cm_lightning.training import train

register_resolvers()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
@user_errors
def main(cfg):
    train(cfg)


if __name__ == "__main__":
    main()
