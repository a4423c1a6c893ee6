"""Train a model: ``python train.py experiment=digits_ct`` (see conf/ and README.md); ``cm-train`` when installed."""

from cm_lightning.cli import train_main

if __name__ == "__main__":
    train_main()
