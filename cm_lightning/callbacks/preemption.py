"""Preemption: on SIGUSR1 or SIGTERM, finish the optimiser step, write last.ckpt, requeue, exit.

SLURM sends SIGUSR1 ``<lead>`` seconds before the time limit (``#SBATCH --signal=SIGUSR1@<lead>``) and
SIGTERM when it preempts or cancels a job, then SIGKILL ``KillWait`` seconds later. The handler only
notes the signal; the work happens at the next step boundary, where every rank agrees through one
all-reduce (a signal may reach the ranks at different moments), so the checkpoint holds one consistent
step: weights, EMAs, target network, optimiser, data position. A requeue signal (SIGUSR1) then puts
the job back in the queue with ``scontrol requeue``; SIGTERM does not, since ``scancel`` sends it too
(a preempting SLURM requeues the job itself when its PreemptMode says so). The requeued job, or the
same command started again by hand, resumes from that checkpoint (``ckpt_path=auto``).

Lightning's own SLURM handler (an ``hpc_ckpt`` written from inside the signal handler, mid-step) is
switched off by ``training.build`` so that there is one mechanism.
"""

import logging
import signal
import threading

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only

from cm_lightning.callbacks.checkpoint import checkpoint_dir
from cm_lightning.errors import ConfigError
from cm_lightning.runtime import slurm

log = logging.getLogger(__name__)
REQUEUE, STOP = 2, 1


def signal_named(name: str) -> signal.Signals:
    try:
        return signal.Signals[str(name)]
    except KeyError:
        raise ConfigError(
            f"callbacks.preemption: no signal named {name}; use names such as SIGUSR1, SIGUSR2, SIGTERM"
        ) from None


class Preempted(SystemExit):
    """Ends the process with exit code 0 after the checkpoint. A ``SystemExit`` so that nothing on the way
    out (submitit, a sweep) records the interrupted job as finished."""


class Preemption(L.Callback):
    def __init__(self, requeue_signals=("SIGUSR1",), stop_signals=("SIGTERM",)):
        self.actions = {
            **{signal_named(s): STOP for s in stop_signals},
            **{signal_named(s): REQUEUE for s in requeue_signals},
        }
        self.received: signal.Signals | None = None
        self._checked_step = -1

    def _install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # Python's rule for signal handlers
            for signum in self.actions:
                signal.signal(signum, self._note)

    def setup(self, trainer, pl_module, stage):
        self._install()  # a signal while the model and data are set up is acted on at the first step

    def on_train_start(self, trainer, pl_module):
        self._install()  # again: Lightning's SIGTERM handler, set since, would stop without a checkpoint
        self._checked_step = trainer.global_step

    def _note(self, signum, frame) -> None:
        if self.received is None or self.actions[signum] > self.actions[self.received]:
            self.received = signal.Signals(signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._checked_step:  # between the micro-batches of one optimiser step
            return
        self._checked_step = trainer.global_step
        code = self.actions[self.received] if self.received is not None else 0
        code = int(trainer.strategy.reduce(torch.tensor(code, device=pl_module.device), reduce_op="max"))
        if code:
            self.checkpoint_and_exit(trainer, requeue=code == REQUEUE)

    def checkpoint_and_exit(self, trainer, requeue: bool) -> None:
        path = checkpoint_dir(trainer) / "last.ckpt"
        trainer.save_checkpoint(path)  # every rank takes part; it returns once the file is in place
        what = self.received.name if self.received is not None else "another rank's signal"
        head = f"{what} at step {trainer.global_step}: wrote {path}"
        if not requeue:
            rank_zero_only(log.warning)(f"{head}; not requeued")
        elif trainer.is_global_zero:
            job = slurm.job_id()
            log.warning(f"{head}; requeueing SLURM job {job}" if job else head)
            log.warning(slurm.requeue())  # last: SLURM then ends the job, with SIGKILL after KillWait
        raise Preempted(0)
