"""Evaluate a checkpoint: ``python evaluate.py ckpt=PATH [task=sample]`` (each task's options: conf/task/<task>.yaml);
``cm-evaluate`` when installed."""

from cm_lightning.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
