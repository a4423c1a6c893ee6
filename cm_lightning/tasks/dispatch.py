"""``python evaluate.py task=<name>``: each task's function (its options: conf/task/<name>.yaml)."""

from pathlib import Path

from omegaconf import DictConfig

from cm_lightning import wandb_runs
from cm_lightning.inputs import check_evaluation
from cm_lightning.loading import read_once
from cm_lightning.runtime.run_dir import check_output_dir, write_hydra_files
from cm_lightning.tasks.editing import EDIT_TASKS
from cm_lightning.tasks.export import export_task
from cm_lightning.tasks.midpoint import search_midpoint_task
from cm_lightning.tasks.report import report_task
from cm_lightning.tasks.sample import fid_task, sample_task

TASKS = {
    "sample": sample_task,
    "fid": fid_task,
    "search_midpoint": search_midpoint_task,
    "export": export_task,
    "report": report_task,
    **EDIT_TASKS,
}


def evaluate(cfg: DictConfig) -> list[Path]:
    check_evaluation(cfg)
    check_output_dir(cfg.out_dir, cfg.overwrite)
    written = TASKS[cfg.task](cfg)
    write_hydra_files(cfg, cfg.out_dir, cfg.overwrite)  # after the task's own checks: a refused command writes nothing
    if "wandb" in cfg:  # the tasks that read a checkpoint
        wandb_runs.record_evaluation(cfg, written, read_once(cfg.ckpt))
    return written
