"""ADM U-Net (guided-diffusion / consistency-models), state-dict compatible with the authors' checkpoints.

Module names, parameter order and shapes reproduce the released ImageNet-64 and LSUN-256 checkpoints key for
key, so those files load with ``load_state_dict(strict=True)``. The net is conditioned on an already computed
noise scalar; mapping sigma to that scalar is the caller's job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cm_lightning.errors import ConfigError


def timestep_embedding(noise_labels: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding laid out as ADM's: all cosines first, then all sines."""
    half = dim // 2
    dtype = torch.float64 if noise_labels.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=noise_labels.device) / half)
    args = noise_labels.to(dtype)[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in at least float32 so that half-precision activations keep accurate statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The weights too: a teacher stored in bf16 (model.speed.frozen_dtype) still normalises in fp32.
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        weight, bias = (None if p is None else p.to(dtype) for p in (self.weight, self.bias))
        return F.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int, groups: int) -> GroupNorm32:
    # gcd keeps tiny test nets valid while leaving the published configs (multiples of 32) untouched.
    return GroupNorm32(math.gcd(groups, channels), channels)


def pixel_norm(v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """v / RMS over channels (dim 1)."""
    return v / torch.sqrt(v.float().pow(2).mean(dim=1, keepdim=True) + eps).to(v.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    # Residual branches start as the identity, as in the authors' initialisation.
    for p in module.parameters():
        p.detach().zero_()
    return module


class TimestepEmbedSequential(nn.Sequential):
    """Sequential container that hands the embedding to the layers that consume it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int,
        use_scale_shift_norm: bool,
        norm_groups: int,
        up: bool = False,
        down: bool = False,
        double_norm: bool = False,
    ):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.double_norm = double_norm
        self.up, self.down = up, down
        self.in_layers = nn.Sequential(
            normalization(channels, norm_groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels, norm_groups),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.avg_pool2d(x, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.up or self.down:
            # ADM resamples after the norm+SiLU but before the conv, and resamples the skip path identically.
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self._resample(h))
            x = self._resample(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            if self.double_norm:  # sCM's adaptive double normalisation: norm(h) pnorm(s(t)) + pnorm(b(t))
                h = self.out_layers[0](h) * pixel_norm(scale) + pixel_norm(shift)
            else:
                h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over pixels; qkv channels are laid out (three, heads, head_dim) as in the checkpoints."""

    def __init__(self, channels: int, num_heads: int, norm_groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = normalization(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, height * width)
        # (b, heads, pixels, head_dim) each, contiguous: the flash and memory-efficient kernels need unit stride.
        q, k, v = qkv.transpose(-1, -2).contiguous().unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(b, c, height, width)
        return x + self.proj_out(h)


class ADMUNet(nn.Module):
    def __init__(
        self,
        image_size: int,
        in_channels: int = 3,
        out_channels: int | None = None,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_head_channels: int = 64,
        num_heads: int = 1,
        dropout: float = 0.0,
        num_classes: int = 0,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
        norm_groups: int = 32,
        use_checkpoint: bool = False,
        double_norm: bool = False,
        num_times: int = 1,
        null_class: bool = False,
        noise_kind: str = "adm",
    ):
        """``double_norm``: the adaptive scale and shift of every residual block pixel-normalised (sCM's "adaptive
        double normalisation", Section 4.1), which the paper needed for stable continuous-time training; it
        requires ``use_scale_shift_norm``. The time embedding is positional (sinusoidal) by construction, the
        other stability choice of sCM, so TrigFlow's c_noise(t) = t feeds it directly.

        ``num_times=2``: the net is conditioned on two times, ``noise_labels`` of shape (B, 2), each through its own
        embedding MLP and the two embeddings summed (MeanFlow's (t, t - r), as the official DiT's t- and
        h-embedders). ``null_class``: one more label embedding, index ``num_classes``, for "no class"
        (classifier-free guidance). Both off keep the module names and shapes of the authors' checkpoints.

        ``noise_kind``: the c_noise(sigma) the embedding is trained on (``adm``: the authors' 1000 * 0.25 ln sigma),
        which the parameterisation feeds it; kept on the module so that a teacher or a plain state dict loaded
        into this net is fed the same."""
        super().__init__()
        self.noise_kind = noise_kind
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        if not channel_mult:
            raise ConfigError("channel_mult is empty; give one multiplier per resolution level, e.g. (1, 2, 2)")
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            raise ConfigError(
                f"image_size={image_size} is not divisible by 2**(levels-1)={factor} for "
                f"channel_mult={channel_mult}; choose an image size divisible by {factor} or fewer levels"
            )
        resolutions = [image_size // 2**level for level in range(len(channel_mult))]
        unused = [r for r in attention_resolutions if r not in resolutions]
        if unused:
            raise ConfigError(
                f"attention_resolutions={attention_resolutions} contains {unused}, which the net never reaches "
                f"(its resolutions are {resolutions}); use only those values, or () for attention in the "
                f"middle block only"
            )
        if double_norm and not use_scale_shift_norm:
            raise ConfigError(
                "net.double_norm=true normalises the adaptive scale and shift; set net.use_scale_shift_norm=true too"
            )
        if num_classes < 0:
            raise ConfigError(f"num_classes={num_classes} is negative; use 0 for an unconditional net")
        if num_times not in (1, 2):
            raise ConfigError(f"num_times={num_times}; use 1 (one noise level) or 2 (MeanFlow's t and t - r)")
        if null_class and not num_classes:
            raise ConfigError("null_class=true adds a 'no class' label to a class-conditional net; set num_classes")

        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.num_levels = len(channel_mult)
        self.use_checkpoint = use_checkpoint
        self.num_times = num_times
        self.null_class = null_class

        def heads_for(ch: int) -> int:
            if num_head_channels == -1:
                if ch % num_heads:
                    raise ConfigError(
                        f"num_heads={num_heads} does not divide the {ch} channels of an attention block; "
                        f"choose num_heads dividing every attended width or set num_head_channels"
                    )
                return num_heads
            if ch % num_head_channels:
                raise ConfigError(
                    f"num_head_channels={num_head_channels} does not divide the {ch} channels of an attention "
                    f"block; choose a divisor of model_channels*channel_mult or num_head_channels=-1 with num_heads"
                )
            return ch // num_head_channels

        def res_block(ch_in: int, ch_out: int, **updown: bool) -> ResBlock:
            return ResBlock(
                ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm, norm_groups, **updown, double_norm=double_norm
            )

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, heads_for(ch), norm_groups)

        emb_dim = 4 * model_channels

        def time_mlp() -> nn.Sequential:
            return nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.time_embed = time_mlp()
        if num_times == 2:
            self.time_embed2 = time_mlp()
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes + int(null_class), emb_dim)

        ch = model_channels * channel_mult[0]
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, model_channels * mult)]
                ch = model_channels * mult
                if resolutions[level] in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)

        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), attention(ch), res_block(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if resolutions[level] in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(res_block(ch, ch, up=True) if resblock_updown else Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch, norm_groups),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, self.out_channels, 3, padding=1)),
        )

    def _block(self, block: TimestepEmbedSequential, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict from ``x`` (B, C, H, W) given the noise scalar ``noise_labels`` (B,) (or (B, 2) with
        ``num_times=2``) and optional labels (B,)."""
        batch = x.shape[0]
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not have {self.in_channels} channels; pass a "
                f"(B, {self.in_channels}, {self.image_size}, {self.image_size}) tensor or rebuild with "
                f"in_channels={x.shape[1] if x.ndim == 4 else '?'}"
            )
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"input spatial size {tuple(x.shape[-2:])} does not match image_size={self.image_size}; "
                f"resize the images or rebuild the net with that image_size"
            )
        expected = (batch,) if self.num_times == 1 else (batch, self.num_times)
        if noise_labels.shape != expected:
            raise ValueError(
                f"noise_labels has shape {tuple(noise_labels.shape)}; expected {expected}, {self.num_times} "
                "scalar(s) per image (net.num_times)"
            )
        if self.num_classes > 0:
            if class_labels is None:
                raise ValueError(f"this net is class-conditional (num_classes={self.num_classes}); pass class_labels")
            if class_labels.shape != (batch,):
                raise ValueError(
                    f"class_labels has shape {tuple(class_labels.shape)}; expected ({batch},) class indices"
                )
        elif class_labels is not None:
            raise ValueError("this net is unconditional (num_classes=0); pass class_labels=None")

        dtype = self.time_embed[0].weight.dtype
        if self.num_times == 1:
            emb = self.time_embed(timestep_embedding(noise_labels, self.model_channels).to(dtype))
        else:
            emb = sum(
                mlp(timestep_embedding(noise_labels[:, i], self.model_channels).to(dtype))
                for i, mlp in enumerate((self.time_embed, self.time_embed2))
            )
        if self.num_classes > 0:
            emb = emb + self.label_emb(class_labels)

        skips = []
        h = x
        for block in self.input_blocks:
            h = self._block(block, h, emb)
            skips.append(h)
        h = self._block(self.middle_block, h, emb)
        for block in self.output_blocks:
            h = self._block(block, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).type(x.dtype)
