"""Randomness that is a pure function of (seed, step, micro-batch), so that runs resume exactly and
every rank can draw the noise of the *global* batch and keep its own slice: the per-sample noise
does not depend on how many processes share the batch.
"""

import numpy as np
import torch


def mix(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def generator(device: torch.device, *parts: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(mix(*parts))
    return g
