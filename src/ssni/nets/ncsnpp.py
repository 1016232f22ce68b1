"""NCSN++ / DDPM++ epsilon network of score_sde (Song et al., ICLR 2021), BigGAN-style blocks.

Written from the architecture's description for the configuration of the public CIFAR-10 VP
"DDPM++ deep continuous" checkpoint (``checkpoint_8.pth``, used by DiffPure and SSNI): positional
time embedding, BigGAN res-blocks that resample internally (2x2 average pool / nearest 2x, no FIR
filters), single-head attention at 16x16, ``skip_rescale`` (residual sums divided by sqrt(2)), no
progressive growing. State-dict keys and order match the reference (``sigmas`` buffer first, then
one flat ``all_modules`` list), so the public weights load with ``strict=True``.

Call: ``net(x, labels)`` with ``x`` ``(B, C, H, W)`` in [-1, 1] (``centered=True``) and float
``labels = 999 t`` of shape ``(B,)``; returns the predicted noise, shape of ``x``.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NCSNpp", "positional_embedding"]

_SQRT2 = math.sqrt(2.0)


def positional_embedding(labels: Tensor, dim: int, max_positions: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[sin(l f_i), cos(l f_i)]``, ``f_i = max_positions^(-i/(dim/2 - 1))``.

    ``labels`` ``(B,)`` float; returns ``(B, dim)`` in the dtype of ``labels`` (DDPM's variant
    with ``half - 1`` in the exponent's denominator and sine first).
    """
    half = dim // 2
    step = math.log(max_positions) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=labels.dtype, device=labels.device) * -step)
    args = labels[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(channels // 4, 32), channels, eps=1e-6)


class _NIN(nn.Module):
    """Per-pixel linear map ``y = x W + b`` over channels; ``W`` is stored ``(in, out)``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.empty(in_dim, out_dim))
        self.b = nn.Parameter(torch.zeros(out_dim))
        nn.init.normal_(self.W, std=in_dim**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bchw,cd->bdhw", x, self.W) + self.b[None, :, None, None]


class _AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, logits scaled by ``C^-1/2``."""

    def __init__(self, channels: int, skip_rescale: bool) -> None:
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0 = _NIN(channels, channels)
        self.NIN_1 = _NIN(channels, channels)
        self.NIN_2 = _NIN(channels, channels)
        self.NIN_3 = _NIN(channels, channels)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        h = self.GroupNorm_0(x)
        q = self.NIN_0(h).reshape(b, c, hh * ww)
        k = self.NIN_1(h).reshape(b, c, hh * ww)
        v = self.NIN_2(h).reshape(b, c, hh * ww)
        logits = torch.einsum("bcq,bck->bqk", q, k) * (c**-0.5)
        weights = torch.softmax(logits, dim=-1)
        h = torch.einsum("bqk,bck->bcq", weights, v).reshape(b, c, hh, ww)
        out = x + self.NIN_3(h)
        return out / _SQRT2 if self.skip_rescale else out


class _ResBlockBigGAN(nn.Module):
    """GroupNorm-act-[resample]-conv-(+temb)-GroupNorm-act-dropout-conv, plus a skip path."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        temb_dim: Optional[int],
        *,
        up: bool = False,
        down: bool = False,
        dropout: float = 0.1,
        skip_rescale: bool = True,
    ) -> None:
        super().__init__()
        self.GroupNorm_0 = _group_norm(in_ch)
        self.Conv_0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        if temb_dim is not None:
            self.Dense_0 = nn.Linear(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch or up or down:
            self.Conv_2 = nn.Conv2d(in_ch, out_ch, 1)
        self.up, self.down = up, down
        self.skip_rescale = skip_rescale
        self.has_temb = temb_dim is not None
        self.has_skip_conv = in_ch != out_ch or up or down

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, temb: Optional[Tensor] = None) -> Tensor:
        h = self._resample(F.silu(self.GroupNorm_0(x)))
        h = self.Conv_0(h)
        if self.has_temb and temb is not None:
            h = h + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(F.silu(self.GroupNorm_1(h))))
        x = self._resample(x)
        if self.has_skip_conv:
            x = self.Conv_2(x)
        out = x + h
        return out / _SQRT2 if self.skip_rescale else out


class NCSNpp(nn.Module):
    """DDPM++ (score_sde ``ncsnpp`` with ``resblock_type='biggan'``) epsilon network.

    Defaults are the CIFAR-10 VP "deep continuous" model (106.6M parameters).

    Args:
        image_size: input height = width; attention is placed by feature size.
        num_channels: image channels (input and output).
        nf: base width; level ``i`` has ``nf * ch_mult[i]`` channels, the time MLP ``4 nf``.
        ch_mult: per-level channel multipliers (each further level halves H and W).
        num_res_blocks: encoder res-blocks per level (the decoder has one more).
        attn_resolutions: feature sizes (pixels) that get attention blocks.
        dropout: dropout inside res-blocks (inactive in eval mode).
        skip_rescale: divide residual sums by sqrt(2).
        conditional: condition on the time label (time MLP + per-block projection).
        centered: inputs are already in [-1, 1]; ``False`` maps [0, 1] inputs to [-1, 1].
        scale_by_sigma: divide the output by ``sigmas[int(label)]`` (NCSN-style models).
        sigma_min, sigma_max, num_scales: the geometric ``sigmas`` table (a float64 buffer
            kept for checkpoint compatibility; unused unless ``scale_by_sigma``).
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        num_channels: int = 3,
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 8,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        skip_rescale: bool = True,
        conditional: bool = True,
        centered: bool = True,
        scale_by_sigma: bool = False,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        num_scales: int = 1000,
    ) -> None:
        super().__init__()
        if nf % 2 or nf < 4:
            raise ValueError(f"nf must be even and >= 4, got {nf}")
        self.nf = int(nf)
        self.centered = bool(centered)
        self.scale_by_sigma = bool(scale_by_sigma)
        self.conditional = bool(conditional)
        self.num_levels = len(ch_mult)
        self.num_res_blocks = int(num_res_blocks)
        self.register_buffer(
            "sigmas",
            torch.exp(
                torch.linspace(
                    math.log(sigma_max), math.log(sigma_min), num_scales, dtype=torch.float64
                )
            ),
        )

        mods: List[nn.Module] = []
        temb_dim = 4 * nf if conditional else None
        if conditional:
            mods += [nn.Linear(nf, 4 * nf), nn.Linear(4 * nf, 4 * nf)]
        mods.append(nn.Conv2d(num_channels, nf, 3, padding=1))

        def block(cin: int, cout: int, **kw: bool) -> nn.Module:
            return _ResBlockBigGAN(
                cin, cout, temb_dim, dropout=dropout, skip_rescale=skip_rescale, **kw
            )

        # Encoder: the plan below is replayed in the same order by forward().
        self._attn_at_level = [
            image_size // 2**lvl in attn_resolutions for lvl in range(len(ch_mult))
        ]
        skip_ch = [nf]
        ch = nf
        for lvl, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                mods.append(block(ch, nf * mult))
                ch = nf * mult
                if self._attn_at_level[lvl]:
                    mods.append(_AttnBlock(ch, skip_rescale))
                skip_ch.append(ch)
            if lvl != len(ch_mult) - 1:
                mods.append(block(ch, ch, down=True))
                skip_ch.append(ch)
        # Bottleneck: res - attention - res.
        mods += [block(ch, ch), _AttnBlock(ch, skip_rescale), block(ch, ch)]
        # Decoder.
        for lvl in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                mods.append(block(ch + skip_ch.pop(), nf * ch_mult[lvl]))
                ch = nf * ch_mult[lvl]
            if self._attn_at_level[lvl]:
                mods.append(_AttnBlock(ch, skip_rescale))
            if lvl != 0:
                mods.append(block(ch, ch, up=True))
        mods += [_group_norm(ch), nn.Conv2d(ch, num_channels, 3, padding=1)]
        self.all_modules = nn.ModuleList(mods)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        """``x`` ``(B, C, H, W)``, ``labels`` ``(B,)`` float (``999 t``) -> eps, shape of ``x``."""
        mods: Iterator[nn.Module] = iter(self.all_modules)
        temb: Optional[Tensor] = None
        if self.conditional:
            dense0, dense1 = next(mods), next(mods)
            wdtype = dense0.weight.dtype
            emb_dtype = torch.float64 if wdtype == torch.float64 else torch.float32
            emb = positional_embedding(labels.to(emb_dtype), self.nf).to(wdtype)
            temb = dense1(F.silu(dense0(emb)))
        h = x if self.centered else 2.0 * x - 1.0
        h = next(mods)(h)
        skips = [h]
        for lvl in range(self.num_levels):
            for _ in range(self.num_res_blocks):
                h = next(mods)(h, temb)
                if self._attn_at_level[lvl]:
                    h = next(mods)(h)
                skips.append(h)
            if lvl != self.num_levels - 1:
                h = next(mods)(h, temb)
                skips.append(h)
        h = next(mods)(h, temb)
        h = next(mods)(h)
        h = next(mods)(h, temb)
        for lvl in reversed(range(self.num_levels)):
            for _ in range(self.num_res_blocks + 1):
                h = next(mods)(torch.cat([h, skips.pop()], dim=1), temb)
            if self._attn_at_level[lvl]:
                h = next(mods)(h)
            if lvl != 0:
                h = next(mods)(h, temb)
        h = F.silu(next(mods)(h))
        h = next(mods)(h)
        if self.scale_by_sigma:
            idx = labels.detach().long().clamp(0, self.sigmas.shape[0] - 1)
            h = h / self.sigmas[idx].to(h.dtype).reshape(-1, 1, 1, 1)
        return h

    @classmethod
    def from_score_sde_config(cls, config: Mapping[str, Any]) -> NCSNpp:
        """Build from a score_sde config as a nested mapping (``{"model": ..., "data": ...}``).

        Only the DDPM++ options are supported (``resblock_type='biggan'``, ``fir=False``,
        ``progressive='none'``, ``embedding_type='positional'``); others raise ``ValueError``.
        """
        model = dict(config.get("model", {}))
        data = dict(config.get("data", {}))
        required = {
            "resblock_type": "biggan",
            "fir": False,
            "progressive": "none",
            "progressive_input": "none",
            "embedding_type": "positional",
            "nonlinearity": "swish",
            "normalization": "GroupNorm",
        }
        for key, want in required.items():
            if key in model and model[key] != want:
                raise ValueError(f"NCSNpp supports model.{key}={want!r} only, got {model[key]!r}")
        kwargs = {
            "nf": model.get("nf"),
            "ch_mult": model.get("ch_mult"),
            "num_res_blocks": model.get("num_res_blocks"),
            "attn_resolutions": model.get("attn_resolutions"),
            "dropout": model.get("dropout"),
            "skip_rescale": model.get("skip_rescale"),
            "conditional": model.get("conditional"),
            "scale_by_sigma": model.get("scale_by_sigma"),
            "sigma_min": model.get("sigma_min"),
            "sigma_max": model.get("sigma_max"),
            "num_scales": model.get("num_scales"),
            "image_size": data.get("image_size"),
            "num_channels": data.get("num_channels"),
            "centered": data.get("centered"),
        }
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        for key in ("ch_mult", "attn_resolutions"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)
