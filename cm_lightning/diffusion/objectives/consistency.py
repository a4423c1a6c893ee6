"""The discrete consistency loss of CD, CT, iCT and ECT (CM paper, eq. 7 and 10; iCT; ECT):

    loss = lambda(t, r) * d( f_theta(x0 + t z, t),  sg f_target(x_r, r) ),   target x0 where r = 0

The pair rule (``diffusion/pair_rules.py``) is all in which the four methods differ: how (t, r) are drawn, how
x_r is built (a teacher's ODE step for CD, x0 + r z otherwise) and how the pair is weighted.
"""

import torch

from cm_lightning.diffusion.objectives.base import Objective, StepContext


class DiscreteConsistency(Objective):
    frozen = ("pair.teacher.", "distance.")

    def __init__(self, parameterisation, pair, distance):
        super().__init__(parameterisation)
        self.pair, self.distance = pair, distance

    @property
    def has_target_network(self) -> bool:
        return not self.pair.uses_online_target

    @property
    def requires_teacher(self) -> bool:
        return self.pair.requires_teacher

    @property
    def teacher(self):
        return getattr(self.pair, "teacher", None)

    def attach_teacher(self, teacher) -> None:
        self.pair.teacher = teacher

    def state(self, step: int) -> dict:
        return self.pair.state(step)

    def method_facts(self, max_steps: int) -> dict:
        return {"family": self.pair.family, "num_scales": self.pair.final_scales(max_steps)}

    def outputs(self, student, target_net, x0, labels, ctx: StepContext):
        """Student output f_theta(x0 + t z, t), the target sg f_target(x_r, r), and (t, r)."""
        g, shape, f = ctx.generator, x0.shape, self.parameterisation
        t, r, z = ctx.draw(
            shape[0],
            lambda b: (
                *self.pair.sample_levels(ctx.step, b, g),
                torch.randn((b, *shape[1:]), generator=g, device=g.device),
            ),
        )
        ctx.reseed_dropout()
        student_out = f(student, f.add_noise(x0, z, t), t, labels)
        # The teacher's and the target's evaluations keep no autograd state at all (inference mode); the
        # clone turns the result back into an ordinary tensor that the loss may save for its backward.
        with torch.inference_mode():
            x_r = self.pair.target_input(x0, z, t, r, labels)
            ctx.reseed_dropout()  # the same dropout masks as the student's forward
            target = f(student if target_net is None else target_net, x_r, r, labels)
            target = torch.where((r == 0).view(-1, 1, 1, 1), x0, target)
        return student_out, target.clone(), t, r

    def loss(self, student, target_net, x0, labels, ctx: StepContext):
        student_out, target, t, r = self.outputs(student, target_net, x0, labels, ctx)
        weight = self.pair.weight(t, r)
        return weight * self.distance(student_out, target), {"weight": weight.mean()}
