"""What an objective is: the plug-in that makes a training method.

One training step (``modules/generative.py``) draws nothing itself: it hands the objective the networks, the
clean batch, the labels and a ``StepContext``, and the objective returns per-sample losses. The step then
averages them, backpropagates through the student (and the objective's own parameters, which join the
optimiser and the checkpoint), and, when the objective keeps a target network, moves it towards the student
with the rate ``state(step)["mu"]``.
"""

import abc
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class StepContext:
    """What one micro-batch's loss may use besides the networks and the data.

    step: the optimiser step (curricula, warm-ups). generator: the step's random stream, the same on every
    rank. draw(local, fn): calls ``fn(global_batch)`` and keeps this rank's rows, so each sample's noise depends
    on its place in the global batch and not on the number of ranks. reseed_dropout(): re-applies the step's
    dropout seed, so that two forwards of one network draw the same masks (the student and its target).
    """

    step: int
    generator: torch.Generator
    draw: Callable
    reseed_dropout: Callable[[], None]


class Objective(nn.Module, abc.ABC):
    """A method's loss. ``parameterisation`` (diffusion/precond.py) is how its network's output becomes an image,
    which the samplers use. ``has_target_network``: the module keeps theta^- <- mu theta^- + (1 - mu) theta.
    ``requires_teacher``: the module loads ``model.teacher_ckpt`` and calls ``attach_teacher``. ``frozen``:
    prefixes of submodules rebuilt from the config rather than saved (a frozen teacher, LPIPS)."""

    has_target_network = False
    requires_teacher = False
    frozen: tuple[str, ...] = ()

    def __init__(self, parameterisation):
        super().__init__()
        self.parameterisation = parameterisation

    def state(self, step: int) -> dict[str, float]:
        """Scalars that depend on the step alone (logged each step; ``mu`` drives the target network)."""
        return {}

    @property
    def teacher(self) -> nn.Module | None:
        return self._modules.get("teacher")

    def attach_teacher(self, teacher: nn.Module) -> None:
        self._modules["teacher"] = teacher  # a submodule behind the read-only ``teacher`` property

    def check(self, net: nn.Module) -> None:
        """Stops before the first step when ``net`` cannot serve this objective."""

    def method_facts(self, max_steps: int) -> dict | None:
        """What the editing tasks need to know of the method, stored in checkpoints: ``family`` ('cd' or 'ct')
        and ``num_scales``, the discrete grid's N at step ``max_steps`` (0 without a grid), which pick the
        published editing levels; None for a method without a discrete pair rule."""
        return None

    @abc.abstractmethod
    def loss(
        self, student: nn.Module, target_net: nn.Module | None, x0: torch.Tensor, labels, ctx: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample losses (B,) and extra per-batch values to log."""
