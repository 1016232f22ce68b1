"""A small DDPM-style epsilon-prediction UNet (Ho et al. 2020), sized for 28x28 images.

``UNet(**kwargs)(x, label)``: ``x`` model-space images ``(B, C, H, W)`` in [-1, 1], ``label`` the
continuous time label ``(B,)`` (``t * 1000`` for ``t`` in [0, 1]); returns predicted noise of the
shape of ``x``. Residual blocks with GroupNorm and SiLU, a sinusoidal time embedding, stride-2
convolutions down, nearest-neighbour upsampling up, and self-attention at the chosen levels and in
the middle. Any ``H, W`` works (skips are matched by size), e.g. 28x28 with three levels or 8x8
with two.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNet", "timestep_embedding"]


def timestep_embedding(label: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``(B, dim)`` of continuous labels ``(B,)`` (cos half, sin half)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=label.device, dtype=torch.float32) / half
    )
    args = label.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    g = math.gcd(groups, channels)
    return nn.GroupNorm(g, channels)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(t_dim, c_out)
        self.norm2 = _norm(c_out, groups)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int, groups: int, heads: int) -> None:
        super().__init__()
        self.heads = heads if channels % heads == 0 else 1
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class UNet(nn.Module):
    """Epsilon-prediction UNet; see the module docstring.

    Args:
        in_channels: image channels (1 for Fashion-MNIST).
        out_channels: output channels; default ``in_channels``.
        base_channels: channels of the first level.
        channel_mults: per-level channel multipliers; ``len`` is the number of levels (each level
            after the first halves the resolution).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_levels: level indices (0 = full resolution) with self-attention.
        dropout: dropout inside residual blocks.
        groups: GroupNorm groups (reduced to a divisor of the channel count when needed).
        heads: attention heads.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_levels: Sequence[int] = (2,),
        dropout: float = 0.0,
        groups: int = 8,
        heads: int = 4,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.base_channels = base_channels
        t_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim)
        )
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        levels = len(channel_mults)
        self.down = nn.ModuleList()
        skip_ch: List[int] = [base_channels]
        ch = base_channels
        for i, mult in enumerate(channel_mults):
            c_out = base_channels * mult
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, c_out, t_dim, groups, dropout))
                ch = c_out
                if i in attn_levels:
                    self.down.append(AttnBlock(ch, groups, heads))
                skip_ch.append(ch)
            if i < levels - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_ch.append(ch)

        self.mid = nn.ModuleList(
            [
                ResBlock(ch, ch, t_dim, groups, dropout),
                AttnBlock(ch, groups, heads),
                ResBlock(ch, ch, t_dim, groups, dropout),
            ]
        )

        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            c_out = base_channels * channel_mults[i]
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + skip_ch.pop(), c_out, t_dim, groups, dropout))
                ch = c_out
                if i in attn_levels:
                    self.up.append(AttnBlock(ch, groups, heads))
            if i > 0:
                self.up.append(nn.Conv2d(ch, ch, 3, padding=1))  # after nearest upsampling

        self.norm_out = _norm(ch, groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, label: Tensor) -> Tensor:
        """``x`` ``(B, C, H, W)``, ``label`` ``(B,)`` (``t * 1000``) -> eps ``(B, C_out, H, W)``."""
        if label.dim() == 0:
            label = label.expand(x.shape[0])
        temb = self.time_mlp(timestep_embedding(label, self.base_channels).to(x.dtype))
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, ResBlock):
                h = layer(h, temb)
                skips.append(h)
            elif isinstance(layer, AttnBlock):
                h = layer(h)
                skips[-1] = h
            else:
                h = layer(h)
                skips.append(h)
        for layer in self.mid:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), temb)
            elif isinstance(layer, AttnBlock):
                h = layer(h)
            else:
                h = layer(F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))
