"""Checkpoints that survive being killed: atomic writes, a last.ckpt at the end of training, and the
choice of the checkpoint a run resumes from (the newest readable one, saying so when it skips one).

A write goes through ``runtime/atomic.py``: a hidden partial file in the same directory, flushed to disk,
then renamed over the target, which POSIX file systems do atomically: a process killed mid-write leaves the
previous file whole, and a failed write (a full disk) removes its partial file.
"""

import logging
import os
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cm_lightning.errors import ConfigError
from cm_lightning.runtime import atomic
from cm_lightning.untrusted import UnloadableFile, load_file

log = logging.getLogger(__name__)


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that overwrites rather than writing ``last-v1.ckpt`` beside an existing
    file (a resumed run rewrites the same steps), and writes last.ckpt when training ends."""

    def __init__(self, *args, enable_version_counter: bool = False, **kwargs):
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)

    def on_train_end(self, trainer, pl_module):
        if self.save_last and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic (see the module docstring)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        with atomic.replacing(path) as partial:  # a full disk: one line, and the partial file removed
            super().save_checkpoint(checkpoint, partial, storage_options)


def checkpoint_dir(trainer) -> Path:
    """Where this run's checkpoints go: the checkpoint callback's directory, else <run dir>/checkpoints."""
    cb = trainer.checkpoint_callback
    return Path(cb.dirpath) if cb is not None and cb.dirpath else Path(trainer.default_root_dir) / "checkpoints"


def check_writable(dirpath, what: str = "callbacks.checkpoint.dirpath") -> None:
    """Fails at start rather than at the first save, hours later: creates the directory and a probe file."""
    dirpath = Path(str(dirpath))
    probe = dirpath / f".write-test-{os.getpid()}"
    try:
        dirpath.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{what}={dirpath} is not writable ({exc.strerror or exc}); choose a directory you can "
            f"write to with {what}=... (or hydra.run.dir=...)"
        ) from None


def unreadable(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (truncated, not a checkpoint, holding code), or None. Read
    with ``weights_only=True`` and memory-mapped, so only the archive's index and the pickled structure are
    read, not the tensors, and nothing in the file is executed (``untrusted.py``)."""
    try:
        ckpt = load_file(path, "checkpoint", mmap=True)
    except UnloadableFile as exc:
        return exc.reason
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        return "not a Lightning training checkpoint"
    return None


def newest_first(dirpath) -> list[Path]:
    """The ``*.ckpt`` files of ``dirpath``, newest first (last.ckpt first among equally new files)."""
    dirpath = Path(str(dirpath))
    if not dirpath.is_dir():
        return []
    found = []
    for path in dirpath.glob("*.ckpt"):
        try:
            found.append((path.stat().st_mtime, path.name == "last.ckpt", path))
        except OSError as exc:  # a dangling or looping symlink: nothing to resume from
            rank_zero_only(log.warning)(f"{path} is skipped: it cannot be opened ({exc.strerror or exc})")
    return [path for *_, path in sorted(found, reverse=True)]


def latest_readable(dirpath) -> Path | None:
    """The newest ``*.ckpt`` in ``dirpath`` that loads (last.ckpt first among equally new files); a newer
    one that does not is reported and skipped. None when the directory holds no checkpoint."""
    files = newest_first(dirpath)
    skipped = []
    for path in files:
        problem = unreadable(path)
        if problem is None:
            if skipped:
                note = f"{'; '.join(skipped)}; resuming from the previous checkpoint {path} instead"
                rank_zero_only(log.warning)(note)
            return path
        skipped.append(f"{path} is unreadable, probably truncated or corrupt ({problem})")
    if files:
        raise ConfigError(
            f"no checkpoint in {dirpath} can be read: {'; '.join(skipped)}. Start afresh with "
            "ckpt_path=null (or another hydra.run.dir), or name a good file with ckpt_path=..."
        )
    return None


def resume_path(ckpt_path, dirpath) -> str | None:
    """What ``trainer.fit`` resumes from: ``auto`` is the newest readable checkpoint of this run's
    directory (None for a new run), an explicit path must be readable, ``None`` starts afresh."""
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "auto":
        found = latest_readable(dirpath)
        if found:
            rank_zero_only(log.info)(f"resuming from {found}")
        return None if found is None else str(found)
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path} does not exist; pass a run's checkpoints/last.ckpt, or "
            "ckpt_path=auto to resume the run in hydra.run.dir"
        )
    problem = unreadable(path)
    if problem:
        raise ConfigError(
            f"ckpt_path={ckpt_path} cannot be read ({problem}); pass an earlier checkpoint of the "
            "run, or ckpt_path=auto to take the newest readable one"
        )
    return str(path)
