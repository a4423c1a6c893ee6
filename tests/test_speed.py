"""Speed options (cm_lightning/runtime/speed.py): they change how fast, not what is computed."""

import functools
import math

import lightning as L
import pytest
import torch
from helpers import TINY
from helpers.builders import cpu_trainer, ct_module, randomise, tiny_net
from lightning.pytorch.plugins.precision import MixedPrecision

from cm_lightning.errors import ConfigError
from cm_lightning.runtime.speed import Speed, amp_dtype, auto_precision


def prepared(speed: Speed, dropout: float = 0.1):
    """A CT module with non-zero weights (same seed every call), set up as ``trainer.fit`` would."""
    torch.manual_seed(0)
    module = ct_module(randomise(tiny_net(dropout=dropout)))
    module.speed = speed
    module.trainer = cpu_trainer()
    module.setup("fit")
    return module


def loss_and_grads(module, x):
    losses, _ = module.losses(x, None, 0)
    loss = losses.mean()
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in module.net.parameters()])


def test_auto_is_on_for_cuda_only():
    cpu, cuda = Speed().resolved(torch.device("cpu")), Speed().resolved(torch.device("cuda"))
    assert (cpu.channels_last, cpu.compile, cpu.fused_optimizer) == (False, False, False)
    assert (cuda.channels_last, cuda.compile, cuda.fused_optimizer) == (True, True, True)
    assert auto_precision("cpu") == auto_precision(torch.device("cpu")) == "32-true"
    assert auto_precision() == auto_precision("gpu") == ("bf16-mixed" if torch.cuda.is_available() else "32-true")


@pytest.mark.parametrize("field, value", [("compile", "yes"), ("channels_last", 1.5), ("frozen_dtype", "half")])
def test_bad_values_name_themselves(field, value):
    with pytest.raises(ConfigError, match=f"speed.{field}={value!r}"):
        Speed(**{field: value})
    with pytest.raises(ConfigError, match="precision='8-mixed'"):
        amp_dtype("8-mixed")
    assert amp_dtype("bf16-mixed") == torch.bfloat16 and amp_dtype("16-mixed") == torch.float16


def test_fused_kernel_where_the_optimiser_has_one():
    params = [torch.nn.Parameter(torch.zeros(3))]
    speed = Speed(fused_optimizer=True)
    adam = speed.optimizer(functools.partial(torch.optim.Adam, lr=1e-3), params, torch.device("cuda"))
    radam = speed.optimizer(functools.partial(torch.optim.RAdam, lr=1e-3), params, torch.device("cuda"))
    assert adam.defaults["fused"] is True and radam.defaults["foreach"] is True
    plain = speed.optimizer(functools.partial(torch.optim.Adam, lr=1e-3), params, torch.device("cpu"))
    assert not plain.defaults["fused"]


@pytest.mark.slow  # torch.compile's first compile: minutes on 2 CPU cores
def test_channels_last_and_compile_keep_the_loss_gradients_and_checkpoint_keys():
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    eager = prepared(Speed(channels_last=False, compile=False), dropout=0.0)
    fast = prepared(Speed(channels_last=True, compile=True), dropout=0.0)
    assert fast.net.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert list(fast.state_dict()) == list(eager.state_dict())  # no "_orig_mod." prefixes in checkpoints
    loss, grads = loss_and_grads(eager, x)
    fast_loss, fast_grads = loss_and_grads(fast, x)
    assert loss > 0
    # The same arithmetic up to the order of float32 sums.
    torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_grads, grads, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss = fast.losses(x, None, 0)[0].mean().detach()
    torch.testing.assert_close(bf16_loss, loss, rtol=0.05, atol=0)  # bf16 has 8 bits of mantissa


@pytest.mark.slow  # torch.compile's first compile: minutes on 2 CPU cores
def test_compiled_student_and_target_draw_the_same_dropout_masks():
    """Channels-last lays dropout masks out in another order (another draw, the same distribution), but the
    student and the target, both compiled and channels-last, must still share theirs."""
    fast = prepared(Speed(channels_last=True, compile=True), dropout=0.3)
    x, sigma = torch.rand(4, 1, 8, 8), torch.full((4,), 1.0)
    fast.seed_dropout(0)
    student = fast.parameterisation(fast.net, x, sigma)
    with torch.inference_mode():
        fast.seed_dropout(0)
        target = fast.parameterisation(fast.target_net, x, sigma)
        other = fast.parameterisation(fast.target_net, x, sigma)  # the next masks of the generator
    torch.testing.assert_close(student.detach(), target, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(target, other)


def test_bf16_mixed_training_keeps_the_teacher_in_bf16_and_the_weights_in_fp32(tmp_path, edm_run):
    from helpers.launch import compose_run
    from hydra.utils import instantiate

    cfg = compose_run(
        "train",
        [
            "experiment=digits_cd",
            *TINY,
            "trainer.max_steps=2",
            "trainer.precision=bf16-mixed",
            f"model.teacher_ckpt={edm_run / 'checkpoints/last.ckpt'}",
            "logger=none",
        ],
        tmp_path,
    )
    model, data = instantiate(cfg.model), instantiate(cfg.data, seed=0)
    trainer = cpu_trainer(max_steps=2, precision="bf16-mixed", limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    assert next(model.objective.pair.teacher.net.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in model.net.parameters()} == {torch.float32}
    assert {p.dtype for p in model.target_net.parameters()} == {torch.float32}
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


class OverflowAt(L.Callback):
    """Makes step ``step``'s loss infinite, as an fp16 overflow would, and records the weights around it."""

    def __init__(self, step: int):
        self.step, self.weights = step, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in (self.step, self.step + 1):
            self.weights[trainer.global_step] = torch.cat([p.detach().flatten() for p in pl_module.net.parameters()])
        if trainer.global_step == self.step:
            batch[0].fill_(math.inf)


def test_fp16_loss_scaler_skips_an_overflowing_step(tmp_path):
    from cm_lightning.callbacks.finite_loss import FiniteLoss

    torch.manual_seed(0)
    module = ct_module(randomise(tiny_net()))
    images, labels = torch.rand(64, 1, 8, 8) * 2 - 1, torch.zeros(64, dtype=torch.long)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=8)
    probe = OverflowAt(2)
    scaler = torch.amp.GradScaler("cpu")
    trainer = cpu_trainer(
        max_steps=5,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        callbacks=[FiniteLoss(), probe],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=data)
    assert trainer.global_step == 5
    assert torch.equal(probe.weights[2], probe.weights[3])  # the overflowing step changed nothing
    assert scaler.get_scale() < 2.0**16  # and lowered the scale
    for net in (module.net, module.target_net, *module.ema):
        assert all(torch.isfinite(p).all() for p in net.parameters())


def test_sampler_speed_up_samples_the_same_images_to_bf16_tolerance():
    from cm_lightning.diffusion.precond import consistency_function
    from cm_lightning.sampler import Sampler

    torch.manual_seed(0)
    net = randomise(tiny_net(), std=0.05).eval()
    plain = Sampler(net, consistency_function())
    reference, _ = plain(8, steps=2, seed=3)
    fast = Sampler(net, consistency_function()).speed_up(
        Speed(channels_last=True, compile=False), "bf16-mixed", torch.device("cpu")
    )
    assert fast.amp == torch.bfloat16 and not fast.cuda_graphs
    images, _ = fast(8, steps=2, seed=3)
    assert images.dtype == torch.float32
    torch.testing.assert_close(images, reference, rtol=0, atol=0.05)
