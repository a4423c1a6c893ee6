"""NCSN++ and DDPM++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs"): the CIFAR-10
backbones of the CM, iCT and ECT papers, in the shape EDM (Karras et al. 2022, Appendix F.2) gives them.

One U-Net, two published settings (``conf/net/ncsnpp_cifar10.yaml``, ``conf/net/ddpmpp_cifar10.yaml``):

- NCSN++: Fourier noise embedding (random frequencies ~ N(0, scale^2), scale 16; iCT uses 0.02), a
  "residual" encoder that also feeds a resampled copy of the input into every level, FIR resampling
  with the filter [1, 3, 3, 1];
- DDPM++: positional (sinusoidal) noise embedding, a plain encoder, box resampling with [1, 1].

Two choices reproduce EDM's networks exactly, so that NVlabs' released CIFAR-10 / FFHQ / AFHQ pickles load
(``nets/edm_layout.py``): ``embedding_endpoint`` (DDPM++'s frequencies reach 1/max_positions) and
``aux_conv_first`` (NCSN++'s progressive input convolved before it is downsampled). Both default to off, the
layout of the runs trained before they existed; the published configs turn them on.

Both use BigGAN-style residual blocks (the up/down-sampling happens inside the block, on the main
and the skip path) and scale every residual sum by sqrt(1/2). Like the ADM U-Net the network takes
an already computed noise scalar; EDM feeds these nets c_noise = 0.25 ln(sigma) (``noise_kind: edm`` in their configs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cm_lightning.errors import ConfigError

SKIP_SCALE = math.sqrt(0.5)


class FourierEmbedding(nn.Module):
    """[cos(2 pi f_i c), sin(2 pi f_i c)] with fixed random frequencies f_i ~ N(0, scale^2) (NCSN++)."""

    def __init__(self, channels: int, scale: float = 16.0):
        super().__init__()
        # A buffer, not a parameter: saved with the weights so that a copy of the net embeds identically.
        self.register_buffer("freqs", torch.randn(channels // 2) * scale)

    def forward(self, noise_labels: torch.Tensor) -> torch.Tensor:
        args = noise_labels.float().outer(2 * math.pi * self.freqs)
        return torch.cat([args.cos(), args.sin()], dim=1)


class PositionalEmbedding(nn.Module):
    """[cos(s c w_i), sin(s c w_i)] with w_i = max_positions^(-i / half), i = 0..half-1 (DDPM++); with
    ``endpoint`` w_i = max_positions^(-i / (half - 1)), so that the last frequency is 1/max_positions (EDM's)."""

    def __init__(self, channels: int, scale: float = 1.0, max_positions: float = 10000.0, endpoint: bool = False):
        super().__init__()
        half = channels // 2
        steps = torch.arange(half, dtype=torch.float32) / (half - int(endpoint))
        self.register_buffer("freqs", max_positions**-steps, persistent=False)
        self.scale, self.endpoint = scale, endpoint

    def forward(self, noise_labels: torch.Tensor) -> torch.Tensor:
        args = (self.scale * noise_labels.float()).outer(self.freqs)
        return torch.cat([args.cos(), args.sin()], dim=1)


class Resample(nn.Module):
    """Depthwise 2x up- or down-sampling with the separable filter outer(taps, taps) / sum(taps)^2.

    [1, 1] is the 2x2 box (average pooling down, nearest up); [1, 3, 3, 1] is the FIR filter of NCSN++.
    """

    def __init__(self, taps: Sequence[float], up: bool):
        super().__init__()
        self.taps, self.up, self.pad = tuple(float(t) for t in taps), up, (len(taps) - 1) // 2
        taps = torch.as_tensor(self.taps, dtype=torch.float32)
        kernel = taps.outer(taps) / taps.sum() ** 2
        self.register_buffer("kernel", kernel * 4 if up else kernel, persistent=False)

    def forward(self, x: torch.Tensor, pad: int | None = None) -> torch.Tensor:
        c = x.shape[1]
        weight = self.kernel.to(x.dtype).expand(c, 1, *self.kernel.shape)
        op = F.conv_transpose2d if self.up else F.conv2d
        return op(x, weight, stride=2, padding=self.pad if pad is None else pad, groups=c)


class ProgressiveInput(nn.Sequential):
    """NCSN++'s progressive input at one level: the previous level's copy of the input, downsampled and projected
    by a 3x3 convolution. ``conv_first``: the convolution runs at the finer resolution, padded by the filter's
    reach too, before the unpadded downsampling and the bias, as score_sde's and EDM's fused resampling do; otherwise
    it runs on the downsampled copy. The two differ (the kernel spans 3 or 6 finer pixels), and EDM's weights
    need the first."""

    def __init__(self, taps: Sequence[float], cin: int, cout: int, conv_first: bool):
        super().__init__(Resample(taps, up=False), conv(cin, cout, 3))
        self.conv_first = conv_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        resample, layer = self
        if not self.conv_first:
            return layer(resample(x))
        x = F.conv2d(x, layer.weight, padding=layer.padding[0] + resample.pad)
        return resample(x, pad=0) + layer.bias[:, None, None]


def conv(cin: int, cout: int, kernel: int, zero: bool = False) -> nn.Conv2d:
    layer = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
    # EDM's initialisation: Xavier-uniform weights, zero biases; residual outputs start at zero.
    nn.init.zeros_(layer.weight) if zero else nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def linear(cin: int, cout: int) -> nn.Linear:
    layer = nn.Linear(cin, cout)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-6)


class ResBlock(nn.Module):
    """BigGAN-style residual block with optional single-head self-attention:

    h = conv0(resample(SiLU(GN(x)))); h = conv1(dropout(SiLU(GN(h + A emb))));
    x = (h + skip(resample(x))) / sqrt 2;  with attention: x = (x + proj(attn(GN(x)))) / sqrt 2.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        emb_channels: int,
        dropout: float,
        taps: Sequence[float],
        up: bool = False,
        down: bool = False,
        attention: bool = False,
    ):
        super().__init__()
        self.in_channels = cin
        self.resample = Resample(taps, up) if up or down else nn.Identity()
        self.norm0, self.conv0 = group_norm(cin), conv(cin, cout, 3)
        self.affine = linear(emb_channels, cout)
        self.norm1, self.dropout, self.conv1 = group_norm(cout), nn.Dropout(dropout), conv(cout, cout, 3, zero=True)
        self.skip = conv(cin, cout, 1) if cin != cout or up or down else None
        self.attention = attention
        if attention:
            self.norm2, self.qkv, self.proj = group_norm(cout), conv(cout, 3 * cout, 1), conv(cout, cout, 1, zero=True)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(self.resample(F.silu(self.norm0(x))))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
        h = self.conv1(self.dropout(h))
        x = self.resample(x)
        x = (h + (x if self.skip is None else self.skip(x))) * SKIP_SCALE
        if self.attention:
            b, c, height, width = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b, 3, 1, c, height * width).transpose(-1, -2).unbind(1)
            a = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, height, width)
            x = (x + self.proj(a)) * SKIP_SCALE
        return x


class NCSNpp(nn.Module):
    """The NCSN++ / DDPM++ U-Net: ``forward(x, noise_labels, class_labels=None)`` like ``ADMUNet``.

    ``embedding`` is ``fourier`` or ``positional`` (``embedding_scale`` multiplies the Fourier frequencies'
    standard deviation, or the positional embedding's argument); ``encoder`` is ``standard`` or
    ``residual`` (NCSN++'s progressive input); ``resample_filter`` is [1, 1] or [1, 3, 3, 1].
    ``embedding_endpoint`` and ``aux_conv_first``: EDM's positional frequencies and progressive-input order
    (``PositionalEmbedding``, ``ProgressiveInput``).
    ``num_times=2``: conditioned on two times, ``noise_labels`` (B, 2), their embeddings concatenated before the
    mapping MLP (MeanFlow's (t, t - r), as the official PyTorch MeanFlow's DDPM++); 1 keeps the EDM layout.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int = 3,
        out_channels: int | None = None,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        num_res_blocks: int = 4,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        num_classes: int = 0,
        embedding: str = "fourier",
        embedding_scale: float = 16.0,
        noise_channel_mult: int = 2,
        emb_channel_mult: int = 4,
        encoder: str = "residual",
        resample_filter: Sequence[float] = (1, 3, 3, 1),
        num_times: int = 1,
        noise_kind: str = "edm",
        embedding_endpoint: bool = False,
        aux_conv_first: bool = False,
    ):
        """``noise_kind``: the c_noise(sigma) the embedding is trained on (``edm``: 0.25 ln sigma, as EDM feeds
        these nets), which the parameterisation feeds it; kept on the module for teachers and plain state dicts."""
        super().__init__()
        self.noise_kind = noise_kind
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        embeddings = {"fourier": FourierEmbedding, "positional": PositionalEmbedding}
        if embedding not in embeddings:
            raise ConfigError(f"embedding={embedding!r} is unknown; use 'fourier' (NCSN++) or 'positional' (DDPM++)")
        if encoder not in ("standard", "residual"):
            raise ConfigError(f"encoder={encoder!r} is unknown; use 'residual' (NCSN++) or 'standard' (DDPM++)")
        if not channel_mult or image_size % 2 ** (len(channel_mult) - 1):
            raise ConfigError(
                f"image_size={image_size} must be divisible by 2**(len(channel_mult)-1) for "
                f"channel_mult={channel_mult}; change one of them"
            )
        resolutions = [image_size >> level for level in range(len(channel_mult))]
        if any(r not in resolutions for r in attention_resolutions):
            raise ConfigError(
                f"attention_resolutions={attention_resolutions} must be among the net's resolutions {resolutions}"
            )
        if num_classes < 0:
            raise ConfigError(f"num_classes={num_classes} is negative; use 0 for an unconditional net")
        if num_times not in (1, 2):
            raise ConfigError(f"num_times={num_times}; use 1 (one noise level) or 2 (MeanFlow's t and t - r)")
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.num_times = num_times
        out_channels = in_channels if out_channels is None else out_channels
        noise_channels, emb_channels = model_channels * noise_channel_mult, model_channels * emb_channel_mult

        endpoint = {"endpoint": embedding_endpoint} if embedding == "positional" else {}
        self.map_noise = embeddings[embedding](noise_channels, embedding_scale, **endpoint)
        self.map_label = nn.Embedding(num_classes, noise_channels * num_times) if num_classes else None
        self.map_layer0 = linear(noise_channels * num_times, emb_channels)
        self.map_layer1 = linear(emb_channels, emb_channels)

        def block(cin, cout, **kwargs):
            return ResBlock(cin, cout, emb_channels, dropout, resample_filter, **kwargs)

        # Encoder: a named sequence; "aux" entries carry the progressively downsampled input (NCSN++).
        self.enc = nn.ModuleDict()
        cout, caux = in_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res = resolutions[level]
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = conv(cout, model_channels, 3)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, down=True)
                if encoder == "residual":
                    aux = ProgressiveInput(resample_filter, caux, cout, aux_conv_first)
                    self.enc[f"{res}x{res}_aux_residual"] = aux
                    caux = cout
            for i in range(num_res_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = block(cin, cout, attention=res in attention_resolutions)
        skips = [
            m.conv0.out_channels if isinstance(m, ResBlock) else m.out_channels
            for name, m in self.enc.items()
            if "aux" not in name
        ]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = resolutions[level]
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout)
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, up=True)
            for i in range(num_res_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = i == num_res_blocks and res in attention_resolutions
                self.dec[f"{res}x{res}_block{i}"] = block(cin, cout, attention=attention)
        self.out_norm, self.out_conv = group_norm(cout), conv(cout, out_channels, 3, zero=True)

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"input of shape {tuple(x.shape)}; this net takes (B, {self.in_channels}, "
                f"{self.image_size}, {self.image_size})"
            )
        expected = (x.shape[0],) if self.num_times == 1 else (x.shape[0], self.num_times)
        if noise_labels.shape != expected:
            raise ValueError(f"noise_labels has shape {tuple(noise_labels.shape)}; expected {expected} (net.num_times)")
        if (class_labels is None) != (self.map_label is None):
            raise ValueError(
                f"num_classes={self.num_classes}: pass class_labels exactly when the net is class-conditional"
            )
        if self.num_times == 1:
            emb = self.map_noise(noise_labels)
        else:
            emb = torch.cat([self.map_noise(noise_labels[:, i]) for i in range(self.num_times)], dim=1)
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips, aux, h = [], x, x
        for name, layer in self.enc.items():
            if "aux_residual" in name:
                h = skips[-1] = aux = (h + layer(aux)) * SKIP_SCALE
            else:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
                skips.append(h)
        for layer in self.dec.values():
            if h.shape[1] != layer.in_channels:
                h = torch.cat([h, skips.pop()], dim=1)
            h = layer(h, emb)
        return self.out_conv(F.silu(self.out_norm(h)))
