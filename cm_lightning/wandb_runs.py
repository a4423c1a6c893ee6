"""What makes this project's W&B runs findable and comparable: a name from the experiment and the sweep's
overrides, one group per sweep, tags from the config, summaries with the right goal per metric, and
evaluation runs that declare the checkpoint they read and keep what they wrote as artifacts.

The name, group and tags are Hydra resolvers (``conf/logger/wandb.yaml``, ``conf/evaluate.yaml``), so that
the composed config shows them and a user can override any of them.
"""

from pathlib import Path

from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

# W&B rejects longer tags; a longer override still shows in the run's name and config.
MAX_TAG = 64
# The best value of each metric (keys of metrics/fidelity.NAMES' values): W&B's summary keeps it.
GOALS = {"fid": "min", "kid": "min", "is": "max", "precision": "max", "recall": "max", "f_score": "max"}
STEP = "trainer/global_step"  # the step metric Lightning's WandbLogger logs with every row


def run_name(experiment: str, overrides: str) -> str:
    """The experiment, then the command line's overrides (Hydra's ``hydra.job.override_dirname``), which tell
    the jobs of a sweep apart."""
    return f"{experiment} {overrides}" if overrides else experiment


def group(mode, sweep_dir: str, experiment: str) -> str:
    """The jobs of one ``--multirun`` sweep share a group named after its directory; a single run is grouped
    with the other runs of its experiment."""
    if str(mode).endswith("MULTIRUN"):
        return f"{experiment}/{Path(str(sweep_dir)).name}"
    return experiment


def tags(choices: DictConfig, overrides) -> list[str]:
    """The experiment, model, data and network chosen, and each command-line override (``key=value``)."""
    chosen = [choices.get(k) for k in ("experiment", "model", "data", "net")]
    rest = [o for o in overrides if not o.startswith("experiment=")]
    return [t for t in dict.fromkeys([*chosen, *rest]) if t and len(t) <= MAX_TAG]


def define_summaries(experiment, names) -> None:
    """Each metric key ``metrics/<metric>_<sampling>`` keeps its best value as its summary and is plotted
    against the optimiser step."""
    for key in names:
        metric = key.removeprefix("metrics/").rsplit("_", 1)[0]
        if metric in GOALS:
            experiment.define_metric(key, step_metric=STEP, summary=GOALS[metric])


def finish(loggers) -> None:
    """Closes this process's W&B runs: the next job of a sweep in the same process (Hydra's basic launcher)
    would otherwise log into this one's run, which wandb.init returns while it is open."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # a no-op stand-in on ranks other than 0
