"""Per-sample scalars against batches of images."""

import torch


def per_sample(v, x: torch.Tensor):
    """A per-sample level or time (B,) in x's dtype, shaped to broadcast against x (B, C, H, W); a float stays
    a float."""
    if not torch.is_tensor(v):
        return float(v)
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
