"""Exponential moving averages of network weights: the CM target network and the evaluation EMAs."""

import torch
from torch import nn


@torch.no_grad()
def ema_update_(average: nn.Module, source: nn.Module, rate: float) -> None:
    """average <- rate * average + (1 - rate) * source, parameter by parameter; buffers are copied."""
    avg = [p for p in average.parameters()]
    src = [p.detach() for p in source.parameters()]
    if rate == 0.0:
        torch._foreach_copy_(avg, src)
    else:
        torch._foreach_lerp_(avg, src, 1.0 - rate)
    for b_avg, b_src in zip(average.buffers(), source.buffers()):
        b_avg.copy_(b_src)
