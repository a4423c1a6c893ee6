"""What makes this project's W&B runs findable and comparable: a name from the experiment and the sweep's
overrides, one group per sweep, tags from the config, summaries with the right goal per metric, and
evaluation runs that declare the checkpoint they read and keep what they wrote as artifacts.

A training run's name, group and tags are Hydra resolvers (``conf/logger/wandb.yaml``), so that the composed
config shows them and a user can override any of them; an evaluation run takes them from the checkpoint's.
"""

import netrc
import os
from pathlib import Path

import wandb
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from cm_lightning.checkpoint import META_KEY

# W&B rejects longer tags; a longer override still shows in the run's name and config.
MAX_TAG = 64
# The best value of each metric (keys of metrics/fidelity.NAMES' values): W&B's summary keeps it.
GOALS = {"fid": "min", "kid": "min", "is": "max", "precision": "max", "recall": "max", "f_score": "max"}
STEP = "trainer/global_step"  # the step metric Lightning's WandbLogger logs with every row
OUTPUTS = (".json", ".npz", ".png")  # what an evaluation wrote that its artifact keeps (not exported weights)


def wandb_offline() -> bool:
    """Offline unless the user has configured W&B: an API key, WANDB_MODE, or a netrc login."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return False
    try:
        return netrc.netrc(Path.home() / ".netrc").authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def wandb_mode() -> str:
    """wandb.init's mode: WANDB_MODE when set, else offline unless W&B is configured. Lightning's own
    ``offline`` flag refuses ``log_model``; W&B's offline mode keeps artifacts for ``wandb sync``."""
    return os.environ.get("WANDB_MODE") or ("offline" if wandb_offline() else "online")


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


def wandb_identity(loggers) -> dict | None:
    """Where the W&B run of these loggers lives (entity, project, group, name, id), for reports that link it."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            return dict(entity=run.entity, project=run.project, group=run.group, name=run.name, id=run.id)
    return None


def finish(loggers) -> None:
    """Closes this process's W&B runs: the next job of a sweep in the same process (Hydra's basic launcher)
    would otherwise log into this one's run, which wandb.init returns while it is open."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # a no-op stand-in on ranks other than 0


def training_run(path, ckpt: dict) -> dict:
    """The W&B settings (project, name, group, tags) of the run that wrote ``ckpt`` (the checkpoint ``path`` as
    read), from the resolved config it carries, and its run id from the run directory; empty for the authors'
    state dicts."""
    config = ckpt.get(META_KEY, {}).get("config") or {}
    found = dict((config.get("logger") or {}).get("wandb") or {})
    id_file = Path(str(path)).resolve().parent.parent / "wandb_run_id"
    return found | ({"id": id_file.read_text().strip()} if found and id_file.is_file() else {})


def evaluation_logger(cfg: DictConfig, ckpt: dict) -> WandbLogger | None:
    """``wandb.id``: log into that run (e.g. the training run's, beside its curves). ``wandb.log=true``: a run
    of job type ``evaluate`` in the training run's project and group, named after the task and that run."""
    w = cfg.wandb
    if w.id is not None:
        return WandbLogger(id=w.id, project=w.project or "cm-lightning", save_dir=cfg.out_dir, mode=w.mode)
    if not w.log:
        return None
    trained = training_run(cfg.ckpt, ckpt)
    config = OmegaConf.to_container(cfg, resolve=True) | {
        "checkpoint": str(Path(str(cfg.ckpt)).resolve()),
        "checkpoint_run_id": trained.get("id"),
    }
    return WandbLogger(
        project=w.project or trained.get("project") or "cm-lightning",
        save_dir=cfg.out_dir,
        mode=w.mode,
        name=f"{cfg.task} {trained.get('name') or Path(str(cfg.ckpt)).name}",
        group=trained.get("group") or cfg.task,
        job_type="evaluate",
        tags=[cfg.task, *trained.get("tags", [])],
        config=config,
    )


def record_evaluation(cfg: DictConfig, written: list, ckpt: dict) -> None:
    """Ends an evaluation's W&B run (the one a task opened, else a new one): the checkpoint as its input
    artifact (online; W&B has no inputs offline, the run's config names it) and the files it wrote as its
    output artifact."""
    run = wandb.run
    if run is None:
        logger = evaluation_logger(cfg, ckpt) if written else None  # ranks other than 0 wrote nothing
        if logger is None:
            return
        run = logger.experiment
    if not run.offline:
        run.use_artifact(checkpoint_artifact(cfg.ckpt, run.config.get("checkpoint_run_id")))
    outputs = wandb.Artifact(f"evaluation-{run.id}", type="evaluation")
    for path in written:
        if Path(path).suffix in OUTPUTS:
            outputs.add_file(str(path))
    run.log_artifact(outputs)
    run.finish()


def checkpoint_artifact(ckpt, run_id) -> wandb.Artifact:
    """A reference to the checkpoint file, in the collection ``model-<run id>`` where Lightning's WandbLogger
    logs the training run's checkpoints (``log_model``), so both show in the same lineage."""
    artifact = wandb.Artifact(f"model-{run_id}" if run_id else f"checkpoint-{Path(str(ckpt)).stem}", type="model")
    artifact.add_reference(Path(str(ckpt)).resolve().as_uri(), checksum=False)
    return artifact
