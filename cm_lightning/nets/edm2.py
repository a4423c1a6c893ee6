"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", Figure 21 and Appendix B), state-dict compatible with NVlabs/edm2's ``training/networks_edm2.py``.

Module names, order and shapes are those of the official ``UNet`` (the ``unet.`` part of its ``Precond``), so the
released weights map into this net key for key; the uncertainty head ``logvar_*`` of ``Precond`` belongs to the
teacher objective (``diffusion/objectives/edm2.py``). The net is conditioned on an already computed noise scalar:
c_noise = ln(sigma) / 4 into the MP Fourier embedding (``noise_kind: edm``), or, for sCM, TrigFlow's t into a
positional one (``noise_kind: t``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cm_lightning.errors import ConfigError
from cm_lightning.nets.magnitude_preserving import MPConv, MPFourier, MPPositional, mp_cat, mp_silu, mp_sum, normalize


class Block(nn.Module):
    """Encoder or decoder block with optional self-attention (Figure 21): pixel norm on the encoder's main path,
    a residual branch modulated by the embedding, and MP sums with the residual and attention branches."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample: str = "keep",
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
    ):
        super().__init__()
        self.out_channels, self.flavor, self.resample = out_channels, flavor, resample
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        # Created in the official order, which is the order of the state dict's keys.
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, ())
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # The official [1, 1] resampling filter is a 2x2 box: average pooling down, nearest-neighbour up.
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            # CUDA's autocast runs upsampling in fp32; cast back, or the fp32 skip meets a bf16 branch in mp_sum's
            # lerp, which takes one dtype.
            x = F.interpolate(x, scale_factor=2, mode="nearest").to(x.dtype)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            b, ch, height, width = x.shape
            # Channels are laid out (heads, head_dim, q/k/v) as in the official weights.
            qkv = self.attn_qkv(x).reshape(b, self.num_heads, -1, 3, height * width)
            q, k, v = normalize(qkv, dim=2).transpose(2, 4).unbind(3)  # (b, heads, pixels, head_dim) each
            y = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
            y = self.attn_proj(y.transpose(2, 3).reshape(b, ch, height, width))
            x = mp_sum(x, y, t=self.attn_balance)

        return x if self.clip_act is None else x.clamp(-self.clip_act, self.clip_act)


class EDM2UNet(nn.Module):
    def __init__(
        self,
        image_size: int,
        in_channels: int = 4,
        num_classes: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        num_res_blocks: int = 3,
        attention_resolutions: Sequence[int] = (16, 8),
        num_head_channels: int = 64,
        dropout: float = 0.0,
        dropout_resolutions: Sequence[int] | None = None,
        time_embedding: str = "fourier",
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        noise_kind: str = "edm",
    ):
        """The official UNet with the project's argument names (``image_size`` = img_resolution, ``in_channels`` =
        img_channels, ``num_classes`` = label_dim, ``num_res_blocks`` = num_blocks, ``attention_resolutions`` =
        attn_resolutions, ``num_head_channels`` = channels_per_head); the presets differ in ``model_channels``.

        sCM's switches (Lu & Song 2025, Section 4.1 and Appendix G): ``time_embedding=positional`` replaces the MP
        Fourier embedding, whose large random frequencies make continuous-time training unstable, by a
        positional one fed TrigFlow's c_noise(t) = t (``noise_kind: t``); ``dropout_resolutions`` limits dropout
        to those resolutions (sCT on ImageNet 64: 0.45 at <= 16), null meaning every block.

        ``noise_kind``: the c_noise the embedding is trained on (``edm``: ln(sigma) / 4, EDM2's), read by the
        parameterisation, so that a teacher or released weights loaded into this net are fed the same."""
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        if not channel_mult:
            raise ConfigError("net.channel_mult is empty; give one multiplier per resolution, e.g. [1, 2, 3, 4]")
        if image_size % 2 ** (len(channel_mult) - 1):
            raise ConfigError(
                f"net.image_size={image_size} is not divisible by 2**{len(channel_mult) - 1} for "
                f"channel_mult={list(channel_mult)}; choose an image size divisible by it or fewer levels"
            )
        widths = [model_channels * m for m in channel_mult]
        resolutions = [image_size >> level for level in range(len(widths))]
        unused = [r for r in attention_resolutions if r not in resolutions]
        if unused:
            raise ConfigError(
                f"net.attention_resolutions contains {unused}, which the net never reaches (its resolutions are "
                f"{resolutions}); use only those values, or [] for attention in the innermost decoder block only"
            )
        attended = [w for w, res in zip(widths, resolutions) if res in attention_resolutions]
        attended.append(widths[-1])  # the innermost decoder block always attends
        if any(w % num_head_channels for w in attended):
            raise ConfigError(
                f"net.num_head_channels={num_head_channels} does not divide every attended width {attended}; "
                "choose a divisor of model_channels * channel_mult"
            )
        embeddings = {"fourier": MPFourier, "positional": MPPositional}
        if time_embedding not in embeddings:
            raise ConfigError(
                f"net.time_embedding={time_embedding!r} is unknown; use fourier (EDM2) or positional (sCM)"
            )
        if num_classes < 0:
            raise ConfigError(f"net.num_classes={num_classes} is negative; use 0 for an unconditional net")

        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, in_channels
        self.num_classes, self.model_channels, self.noise_kind = num_classes, model_channels, noise_kind
        self.label_balance, self.concat_balance = label_balance, concat_balance
        cemb = max(widths)
        dropout_at = None if dropout_resolutions is None else {int(r) for r in dropout_resolutions}

        def block(cin, cout, res, **kwargs):
            p = dropout if dropout_at is None or res in dropout_at else 0.0
            return Block(cin, cout, cemb, channels_per_head=num_head_channels, dropout=p, **kwargs)

        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = embeddings[time_embedding](widths[0])
        self.emb_noise = MPConv(widths[0], cemb, ())
        self.emb_label = MPConv(num_classes, cemb, ()) if num_classes else None

        self.enc = nn.ModuleDict()
        cout = in_channels + 1  # the constant ones channel gives the first convolution a bias
        for level, channels in enumerate(widths):
            res = image_size >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, channels, (3, 3))
                cout = channels
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, res, flavor="enc", resample="down")
            for idx in range(num_res_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = block(
                    cout, channels, res, flavor="enc", attention=res in attention_resolutions
                )
                cout = channels

        self.dec = nn.ModuleDict()
        skips = [m.out_channels for m in self.enc.values()]
        for level, channels in reversed(list(enumerate(widths))):
            res = image_size >> level
            if level == len(widths) - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, res, flavor="dec", attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout, res, flavor="dec")
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, res, flavor="dec", resample="up")
            for idx in range(num_res_blocks + 1):
                self.dec[f"{res}x{res}_block{idx}"] = block(
                    cout + skips.pop(), channels, res, flavor="dec", attention=res in attention_resolutions
                )
                cout = channels
        self.out_conv = MPConv(cout, in_channels, (3, 3))

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """F(x, c_noise, label) from ``x`` (B, C, H, W), ``noise_labels`` (B,) and class indices (B,)."""
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"input of shape {tuple(x.shape)}; this net takes (B, {self.in_channels}, {self.image_size}, "
                f"{self.image_size}): rebuild it with the data's in_channels and image_size"
            )
        if noise_labels.shape != x.shape[:1]:
            raise ValueError(f"noise_labels has shape {tuple(noise_labels.shape)}; expected ({x.shape[0]},)")
        if (class_labels is None) != (self.emb_label is None):
            raise ValueError(f"num_classes={self.num_classes}: pass class_labels exactly when the net is conditional")

        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            # The official net takes one-hot rows scaled by sqrt(num_classes); the project passes indices.
            onehot = F.one_hot(class_labels.long(), self.num_classes).to(emb.dtype) * math.sqrt(self.num_classes)
            emb = mp_sum(emb, self.emb_label(onehot), t=self.label_balance)
        emb = mp_silu(emb)

        h = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            h = block(h) if name.endswith("_conv") else block(h, emb)
            skips.append(h)
        for name, block in self.dec.items():
            if "block" in name:
                h = mp_cat(h, skips.pop(), t=self.concat_balance)
            h = block(h, emb)
        return self.out_conv(h, gain=self.out_gain).to(x.dtype)
