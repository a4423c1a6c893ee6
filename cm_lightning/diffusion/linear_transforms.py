"""The orthogonal linear transforms A of zero-shot editing (CM paper, Algorithm 4 and Appendix D).

Each maps an image batch (B, C, H, W) to coefficients of the same shape and back with its
transpose, so a mask Omega over coefficients is itself image-shaped:

    Identity      inpainting: A = I, Omega is the pixel mask.
    ChannelBasis  colourisation: per pixel, a 3x3 orthogonal basis of the colour channels whose first
                  axis is the luminance (0.2989, 0.5870, 0.1140) normalised; keep coefficient 0.
    PatchBasis    super-resolution: per factor x factor patch and channel, an orthogonal basis whose
                  first axis is the all-ones vector normalised (the patch mean); keep coefficient 0,
                  stored at the patch's top-left pixel.
"""

import torch

LUMINANCE = (0.2989, 0.5870, 0.1140)


def orthonormal_basis(first_axis) -> torch.Tensor:
    """Q (n x n, orthogonal) with Q[:, 0] = v / |v|: QR of [v, e_2, ..., e_n] (float64, then float32)."""
    v = torch.as_tensor(first_axis, dtype=torch.float64)
    m = torch.eye(v.numel(), dtype=torch.float64)
    m[:, 0] = v / v.norm()
    q = torch.linalg.qr(m).Q
    # QR fixes each column only up to sign; the first must point along v.
    return (q if q[:, 0].sum() > 0 else -q).float()


class Identity:
    """A = I (inpainting)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ChannelBasis:
    """Per-pixel orthogonal basis of the colour channels (colourisation)."""

    def __init__(self, first_axis=LUMINANCE):
        self.q = orthonormal_basis(first_axis)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,cd->bdhw", x, self.q.to(x))

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bdhw,cd->bchw", x, self.q.to(x))

    def keep_first(self, shape) -> torch.Tensor:
        """Omega (1, C, 1, 1): generate every coefficient but the first (luminance)."""
        omega = torch.ones(1, shape[1], 1, 1)
        omega[:, 0] = 0
        return omega


class PatchBasis:
    """Per-patch orthogonal basis whose first axis is the patch mean (super-resolution by ``factor``)."""

    def __init__(self, factor: int):
        self.factor = factor
        self.q = orthonormal_basis(torch.ones(factor * factor))

    def _patches(self, x):
        b, c, h, w = x.shape
        f = self.factor
        return x.reshape(b, c, h // f, f, w // f, f).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // f, w // f, f * f)

    def _image(self, p, shape):
        b, c, h, w = shape
        f = self.factor
        return p.reshape(b, c, h // f, w // f, f, f).permute(0, 1, 2, 4, 3, 5).reshape(shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._image(self._patches(x) @ self.q.to(x), x.shape)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return self._image(self._patches(x) @ self.q.to(x).T, x.shape)

    def keep_first(self, shape) -> torch.Tensor:
        """Omega (1, 1, H, W): generate every coefficient but the first of each patch (its mean)."""
        omega = torch.ones(1, 1, shape[-2], shape[-1])
        omega[..., :: self.factor, :: self.factor] = 0
        return omega
