import lightning as L
import torch
from helpers.builders import cpu_trainer, ct_module, edm_module, pair_outputs, randomise, tiny_net
from torch.utils.data import DataLoader, TensorDataset


def test_student_and_target_see_the_same_dropout_mask():
    torch.manual_seed(0)
    module = ct_module(randomise(tiny_net(dropout=0.5)))
    module.train()
    # With r = t the target's input equals the student's, so only the dropout masks could differ.
    module.objective.pair.sample_levels = lambda step, num, g: (torch.full((num,), 2.0), torch.full((num,), 2.0))
    x0 = torch.randn(4, 1, 8, 8)
    student, target, t, r = pair_outputs(module, x0)
    assert torch.equal(student.detach(), target)
    # The test would catch differing masks: two unseeded forwards differ.
    a = module.parameterisation(module.net, x0, t)
    b = module.parameterisation(module.net, x0, t)
    assert not torch.equal(a, b)


def test_target_and_ema_updates_after_optimizer_step():
    torch.manual_seed(0)
    module = ct_module(randomise(tiny_net()), mu=0.9, ema_rates=(0.99, 0.5))
    old = [p.clone() for p in module.target_net.parameters()]
    old_ema = [[p.clone() for p in e.parameters()] for e in module.ema]
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(1.0)
    module.mu = 0.9
    module.after_optimizer_step()
    for p_old, p_new, p_tgt in zip(old, module.net.parameters(), module.target_net.parameters()):
        torch.testing.assert_close(p_tgt, 0.9 * p_old + 0.1 * p_new)
    for rate, ema, before in zip((0.99, 0.5), module.ema, old_ema):
        for p_old, p_new, p_ema in zip(before, module.net.parameters(), ema.parameters()):
            torch.testing.assert_close(p_ema, rate * p_old + (1 - rate) * p_new)


class Modes(L.Callback):
    """Whether the networks the step runs are in training mode (train.py silences Lightning's warning about
    modules in eval mode, which the EMAs are once they have sampled)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen = {
            name: {m.training for m in net.modules()}
            for name, net in [("net", pl_module.net), ("target", pl_module.target_net)]
        }


def test_one_trainer_step_moves_the_target_by_mu():
    torch.manual_seed(0)
    module = ct_module(randomise(tiny_net()), mu=0.9)
    before = [p.clone() for p in module.net.parameters()]
    data = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)), batch_size=8)
    modes = Modes()
    trainer = cpu_trainer(max_steps=1, callbacks=[modes])
    trainer.fit(module, data)
    # The target runs in training mode too: its dropout masks are the student's (the authors' target_model.train()).
    assert modes.seen == {"net": {True}, "target": {True}}
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(before, module.net.parameters()))
    for p0, p1, pt in zip(before, module.net.parameters(), module.target_net.parameters()):
        torch.testing.assert_close(pt, 0.9 * p0 + 0.1 * p1)


def test_class_conditional_edm_trains_and_samples_with_labels():
    import functools

    torch.manual_seed(0)
    module = edm_module(
        tiny_net(num_classes=10), optimizer=functools.partial(torch.optim.Adam, lr=1e-3), ema_rates=(0.9,)
    )
    data = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.arange(8) % 10), batch_size=4)
    trainer = cpu_trainer(max_steps=2)
    trainer.fit(module, data)
    images, labels = module.sampler()(3, steps=2, seed=1)
    assert images.shape == (3, 1, 8, 8) and labels.shape == (3,) and labels.max() < 10
    given = torch.tensor([1, 2, 3])
    _, same = module.sampler()(3, steps=2, labels=given)
    assert torch.equal(same, given)


def test_edm_rejects_non_positive_p_std():
    import functools

    import pytest

    with pytest.raises(ValueError, match="p_std=0"):
        edm_module(tiny_net(), optimizer=functools.partial(torch.optim.Adam), p_std=0)
