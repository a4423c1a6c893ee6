"""Small builders shared by the tests."""

import functools

import lightning as L
import torch

from cm_lightning.diffusion.curricula import FixedCurriculum
from cm_lightning.diffusion.distances import L2
from cm_lightning.diffusion.objectives.consistency import DiscreteConsistency
from cm_lightning.diffusion.objectives.denoising import Denoising
from cm_lightning.diffusion.pair_rules import CTPairRule
from cm_lightning.diffusion.precond import consistency_function, edm_denoiser
from cm_lightning.modules.generative import GenerativeModule
from cm_lightning.nets.adm import ADMUNet


def tiny_net(dropout: float = 0.0, image_size: int = 8, channels: int = 1, num_classes: int = 0, **options) -> ADMUNet:
    """An ADM U-Net with attention small enough for exact math tests; ``options``: further ADMUNet switches."""
    return ADMUNet(
        image_size=image_size,
        in_channels=channels,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_head_channels=16,
        dropout=dropout,
        num_classes=num_classes,
        **options,
    )


def randomise(net: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Non-zero weights everywhere (ADM zero-initialises its output layers)."""
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, std)
    return net


def consistency_module(net, pair, distance=None, **kwargs) -> GenerativeModule:
    objective = DiscreteConsistency(consistency_function(), pair, distance or L2())
    return GenerativeModule(net=net, objective=objective, **kwargs)


def ct_module(net, mu: float = 0.9, ema_rates=(0.99,), num_scales: int = 10) -> GenerativeModule:
    return consistency_module(
        net,
        CTPairRule(FixedCurriculum(num_scales, mu)),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        ema_rates=ema_rates,
    )


def edm_module(net, p_std: float = 1.2, **kwargs) -> GenerativeModule:
    return GenerativeModule(net=net, objective=Denoising(edm_denoiser(), p_std=p_std), **kwargs)


def pair_outputs(module: GenerativeModule, x0, labels=None, batch_idx: int = 0):
    """The discrete consistency objective's (student output, target, t, r) for one batch."""
    return module.objective.outputs(module.net, module.target_net, x0, labels, module.context(batch_idx))


def cpu_trainer(**kwargs) -> L.Trainer:
    """A quiet one-process CPU Trainer: no logger, checkpoints, progress bar or model summary."""
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


class LinearU(torch.nn.Module):
    """An analytic MeanFlow net, u(z, r, t) = a z + b t + c (t - r), from the times it sees, (t, t - r); its one
    parameter keeps optimisers and EMAs working."""

    def __init__(self, a: float, b: float, c: float):
        super().__init__()
        self.a, self.b, self.c = a, b, c
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z, times, labels=None):
        t, h = times[:, 0].view(-1, 1, 1, 1), times[:, 1].view(-1, 1, 1, 1)
        return self.a * z + self.b * t + self.c * h + self.weight
