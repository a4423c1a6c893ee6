"""DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", Section 3.2), state-dict compatible
with facebookresearch/DiT's ``models.py``.

Patchify (a p x p strided convolution), a fixed 2D sin-cos positional embedding, N adaLN-Zero blocks and a
modulated linear decoder back to patches. Module names and shapes are the official ones (``x_embedder.proj``,
``t_embedder.mlp``, ``y_embedder.embedding_table``, ``blocks.i.attn.qkv``, ``final_layer.linear``, ...), so the
released checkpoints load with ``load_state_dict(strict=True)`` when ``learn_sigma=true`` and ``null_class=true``
(their 2C output channels and their 1,001-row label table). Like the U-Nets, the net is fed already computed
noise labels and knows nothing of sigma.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cm_lightning.errors import ConfigError
from cm_lightning.nets.adm import timestep_embedding


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M, dim): sines of positions * 10000^(-2i/dim), then cosines (the transformer's embedding, in float64)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.reshape(-1, 1).to(torch.float64) * omega
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size^2, dim), tokens in row-major order: the first half of the channels encodes the column, the
    second the row (DiT's ``get_2d_sincos_pos_embed``, whose meshgrid puts w first)."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches to tokens (B, (H/p)(W/p), D)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """A scalar to a D-vector: the 256-wide sinusoidal embedding (cosines first) through a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        weight = self.mlp[0].weight
        return self.mlp(timestep_embedding(t, self.frequency_size).to(weight.dtype))


class Attention(nn.Module):
    """Multi-head self-attention with timm's layout (qkv channels ordered (three, heads, head_dim))."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """timm's Mlp with DiT's tanh-approximated GELU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero (DiT, Section 3.2): the conditioning regresses shift, scale and a gate for the attention and
    the MLP branch; the regressor starts at zero, so every gate is zero and the block starts as the identity."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Modulated LayerNorm and a linear map from each token to its p x p x C patch (zero at initialisation)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 4,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        null_class: bool = False,
        learn_sigma: bool = False,
        num_times: int = 1,
        noise_kind: str = "t",
    ):
        """``num_times=2``: conditioned on (t, t - r) (MeanFlow), ``noise_labels`` of shape (B, 2), the second
        through its own embedder ``h_embedder`` and summed into the conditioning as in the official MeanFlow DiT.
        ``null_class``: one more label row, index ``num_classes``, for "no class" (classifier-free guidance; DiT's
        class dropout row). ``learn_sigma``: DiT's 2C output channels (the released checkpoints' layout), of
        which the first C are returned. ``noise_kind``: the conditioning the embedder is trained on, read by the
        parameterisation (``t``: the time as it is)."""
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(
                f"net.patch_size={patch_size} does not divide the resolution {image_size}; use a patch size "
                f"dividing {image_size} (DiT: 2, 4 or 8 on 32x32 latents)"
            )
        if hidden_size % num_heads or hidden_size % 4:
            raise ConfigError(
                f"net.hidden_size={hidden_size} must be divisible by 4 (the 2D sin-cos embedding) and by "
                f"net.num_heads={num_heads}; choose e.g. hidden_size=64 * num_heads"
            )
        if num_classes < 0:
            raise ConfigError(f"net.num_classes={num_classes} is negative; use 0 for an unconditional net")
        if null_class and not num_classes:
            raise ConfigError("net.null_class=true adds a 'no class' label to a class-conditional net; set num_classes")
        if num_times not in (1, 2):
            raise ConfigError(f"net.num_times={num_times}; use 1 (one noise level) or 2 (MeanFlow's t and t - r)")
        self.image_size, self.in_channels, self.patch_size = image_size, in_channels, patch_size
        self.num_classes, self.null_class, self.num_times = num_classes, null_class, num_times
        self.noise_kind = noise_kind
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        grid = image_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if num_times == 2:
            self.h_embedder = TimestepEmbedder(hidden_size)
        if num_classes:
            self.y_embedder = nn.Module()
            self.y_embedder.embedding_table = nn.Embedding(num_classes + int(null_class), hidden_size)
        # A Parameter (not a buffer) that never trains, because the official checkpoints store it as one.
        self.pos_embed = nn.Parameter(sincos_2d(hidden_size, grid).float()[None], requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears and patch embedding, N(0, 0.02) label and time
        embeddings, and every adaLN regressor and the output layer at zero (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.num_classes:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for embedder in (self.t_embedder, getattr(self, "h_embedder", None)):
            if embedder is not None:
                nn.init.normal_(embedder.mlp[0].weight, std=0.02)
                nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p p C) tokens back to (B, C, H, W) images."""
        b, p, c, h = x.shape[0], self.patch_size, self.out_channels, self.image_size // self.patch_size
        return x.reshape(b, h, h, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, h * p)

    def check_inputs(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels) -> None:
        expected = (x.shape[0],) if self.num_times == 1 else (x.shape[0], 2)
        if x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"input of shape {tuple(x.shape)}; this DiT takes (B, {self.in_channels}, {self.image_size}, "
                f"{self.image_size}): rebuild it with that in_channels and image_size"
            )
        if noise_labels.shape != expected:
            raise ValueError(f"noise_labels has shape {tuple(noise_labels.shape)}; expected {expected} (net.num_times)")
        if bool(self.num_classes) != (class_labels is not None):
            raise ValueError(f"num_classes={self.num_classes}: pass class_labels exactly when the net is conditional")

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict from ``x`` (B, C, H, W) given ``noise_labels`` (B,) (or (B, 2) with ``num_times=2``) and
        optional labels (B,), index ``num_classes`` meaning "no class"."""
        self.check_inputs(x, noise_labels, class_labels)
        if self.num_times == 1:
            c = self.t_embedder(noise_labels)
        else:
            c = self.t_embedder(noise_labels[:, 0]) + self.h_embedder(noise_labels[:, 1])
        if self.num_classes:
            c = c + self.y_embedder.embedding_table(class_labels)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            h = block(h, c)
        out = self.unpatchify(self.final_layer(h, c))
        return out[:, : self.in_channels].type(x.dtype)
