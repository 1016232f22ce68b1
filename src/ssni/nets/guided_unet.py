"""The ADM UNet of guided-diffusion (Dhariwal & Nichol, NeurIPS 2021).

Written from the architecture's description: res-blocks with scale-shift (FiLM) time
conditioning, res-block down/up-sampling (2x2 average pool / nearest 2x), multi-head
self-attention at several resolutions with the "legacy" per-head ``[q, k, v]`` channel layout,
GroupNorm(32, eps 1e-5), learned-sigma output (``2 * in_channels`` channels: eps, then variance
values). State-dict keys match the reference ``UNetModel``, so the public
``256x256_diffusion_uncond.pt`` loads with ``strict=True``.

Call: ``net(x, timesteps)`` with ``x`` ``(B, C, H, W)`` in [-1, 1] and timesteps ``(B,)`` (integer
values 0..999, any dtype); returns ``(B, out_channels, H, W)``.

Half-precision inputs get float32 GroupNorm and softmax, like the reference; float32 and
float64 run natively.
"""

from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GuidedUNet", "timestep_embedding"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """ADM's sinusoidal embedding ``[cos(t f_i), sin(t f_i)]``, ``f_i = max_period^(-i/(dim/2))``.

    ``timesteps`` ``(B,)``; returns ``(B, dim)`` in the floating dtype of ``timesteps``.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=timesteps.dtype, device=timesteps.device)
        / half
    )
    args = timesteps[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class _GroupNorm32(nn.GroupNorm):
    """GroupNorm(32 groups, eps 1e-5); evaluated in float32 for half-precision inputs."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in _LOW_PRECISION:
            return super().forward(x.float()).to(x.dtype)
        return super().forward(x)


def _resample(x: Tensor, up: bool, down: bool) -> Tensor:
    if up:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if down:
        return F.avg_pool2d(x, 2)
    return x


class _Upsample(nn.Module):
    """Nearest 2x, then an optional 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: Optional[int] = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x


class _Downsample(nn.Module):
    """Strided 3x3 conv (key ``op``) or 2x2 average pool."""

    def __init__(self, channels: int, use_conv: bool, out_channels: Optional[int] = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class _ResBlock(nn.Module):
    """ADM res-block: ``in_layers`` (norm, SiLU, conv), ``emb_layers`` (SiLU, linear),
    ``out_layers`` (norm, SiLU, dropout, conv), ``skip_connection`` (1x1 conv if widths differ)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        *,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            _GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_layers = nn.Sequential(
            _GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if out_channels != channels:
            self.skip_connection: nn.Module = nn.Conv2d(channels, out_channels, 1)
        else:
            self.skip_connection = nn.Identity()
        self.up, self.down = up, down
        self.use_scale_shift_norm = use_scale_shift_norm

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        norm, act, conv = self.in_layers
        h = _resample(act(norm(x)), self.up, self.down)
        h = conv(h)
        x = _resample(x, self.up, self.down)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = out_rest(out_norm(h + e))
        return self.skip_connection(x) + h


class _AttentionBlock(nn.Module):
    """Multi-head self-attention over all pixels: ``x + proj_out(attn(qkv(norm(x))))``.

    ``legacy_order=True`` reads the ``3C`` qkv channels as ``(heads, [q, k, v], d)``;
    ``False`` as ``([q, k, v], heads, d)``. q and k are each scaled by ``d^-1/4``.
    """

    def __init__(self, channels: int, num_heads: int, legacy_order: bool = True) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.legacy_order = legacy_order
        self.norm = _GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))
        n, d, length = self.num_heads, c // self.num_heads, flat.shape[-1]
        if self.legacy_order:
            q, k, v = qkv.reshape(b * n, 3 * d, length).split(d, dim=1)
        else:
            q, k, v = (part.reshape(b * n, d, length) for part in qkv.chunk(3, dim=1))
        scale = d**-0.25
        logits = torch.einsum("bci,bcj->bij", q * scale, k * scale)
        if logits.dtype in _LOW_PRECISION:
            weights = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        else:
            weights = torch.softmax(logits, dim=-1)
        h = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, length)
        return (flat + self.proj_out(h)).reshape(x.shape)


class _EmbSequential(nn.Sequential):
    """Sequential that hands the time embedding to res-blocks."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, _ResBlock) else layer(x)
        return x


class GuidedUNet(nn.Module):
    """guided-diffusion ``UNetModel`` (2-D). Defaults: the 256x256 unconditional ImageNet model.

    Args:
        image_size: input height = width (informational; the network is fully convolutional).
        in_channels, out_channels: image channels in; output channels (``2 * in`` with learned
            sigma: ``out[:, :in]`` is eps, the rest are variance values).
        model_channels: base width; the time MLP has ``4 * model_channels`` units.
        num_res_blocks: encoder res-blocks per level (the decoder has one more).
        attention_resolutions: DOWNSAMPLE FACTORS (1, 2, 4, ...) that get attention blocks.
        dropout: dropout inside res-blocks.
        channel_mult: per-level width multipliers.
        num_classes: size of the class-embedding table for class-conditional models.
        num_heads: heads when ``num_head_channels == -1``; ``num_heads_upsample`` for the
            decoder (-1: same as ``num_heads``).
        num_head_channels: channels per head (heads = width / this) unless -1.
        use_scale_shift_norm: FiLM conditioning ``norm(h) (1 + scale) + shift``.
        resblock_updown: resample with res-blocks instead of stand-alone (conv) resamplers.
        use_new_attention_order: the non-legacy qkv layout.
        conv_resample: stand-alone resamplers carry a conv (only if not ``resblock_updown``).
    """

    def __init__(
        self,
        *,
        image_size: int = 256,
        in_channels: int = 3,
        model_channels: int = 256,
        out_channels: int = 6,
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (8, 16, 32),
        dropout: float = 0.0,
        channel_mult: Sequence[Union[int, float]] = (1, 1, 2, 2, 4, 4),
        num_classes: Optional[int] = None,
        num_heads: int = 4,
        num_head_channels: int = 64,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = True,
        use_new_attention_order: bool = False,
        conv_resample: bool = True,
    ) -> None:
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.model_channels = int(model_channels)
        self.num_classes = num_classes
        emb_ch = 4 * model_channels

        def heads(ch: int, default: int) -> int:
            if num_head_channels == -1:
                return default
            if ch % num_head_channels:
                raise ValueError(f"width {ch} is not a multiple of num_head_channels")
            return ch // num_head_channels

        def res(cin: int, cout: int, **kw: bool) -> _ResBlock:
            return _ResBlock(
                cin, emb_ch, cout, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm, **kw
            )

        def attn(ch: int, default_heads: int) -> _AttentionBlock:
            return _AttentionBlock(ch, heads(ch, default_heads), not use_new_attention_order)

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_ch)

        ch = int(channel_mult[0] * model_channels)
        in_blocks: List[nn.Module] = [_EmbSequential(nn.Conv2d(in_channels, ch, 3, padding=1))]
        skip_ch = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: List[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads))
                in_blocks.append(_EmbSequential(*layers))
                skip_ch.append(ch)
            if level != len(channel_mult) - 1:
                if resblock_updown:
                    down: nn.Module = res(ch, ch, down=True)
                else:
                    down = _Downsample(ch, conv_resample)
                in_blocks.append(_EmbSequential(down))
                skip_ch.append(ch)
                ds *= 2
        self.input_blocks = nn.ModuleList(in_blocks)
        self.middle_block = _EmbSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        out_blocks: List[nn.Module] = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_ch.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(res(ch, ch, up=True))
                    else:
                        layers.append(_Upsample(ch, conv_resample))
                    ds //= 2
                out_blocks.append(_EmbSequential(*layers))
        self.output_blocks = nn.ModuleList(out_blocks)
        self.out = nn.Sequential(
            _GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1)
        )

    def forward(self, x: Tensor, timesteps: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """``x`` ``(B, C, H, W)``, ``timesteps`` ``(B,)``, class labels ``y`` ``(B,)`` if
        class-conditional; returns ``(B, out_channels, H, W)``."""
        wdtype = self.time_embed[0].weight.dtype
        emb_dtype = torch.float64 if wdtype == torch.float64 else torch.float32
        emb = timestep_embedding(timesteps.to(emb_dtype), self.model_channels).to(wdtype)
        emb = self.time_embed(emb)
        if self.num_classes is not None:
            if y is None:
                raise ValueError("class-conditional model needs labels y")
            emb = emb + self.label_emb(y)
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GuidedUNet:
        """Build from ``UNetModel`` keyword arguments; ``use_checkpoint`` and ``use_fp16`` are
        ignored (no effect on weights), ``dims`` must be 2."""
        cfg = dict(config)
        cfg.pop("use_checkpoint", None)
        cfg.pop("use_fp16", None)
        dims = cfg.pop("dims", 2)
        if dims != 2:
            raise ValueError(f"only 2-D UNets are supported, got dims={dims}")
        for key in ("attention_resolutions", "channel_mult"):
            if key in cfg:
                cfg[key] = tuple(cfg[key])
        return cls(**cfg)

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> GuidedUNet:
        """Build from guided-diffusion script flags (``model_and_diffusion_defaults`` style:
        ``num_channels``, comma-separated ``attention_resolutions`` in pixels, ``channel_mult``
        string with ``""`` meaning the default for ``image_size``, ``learn_sigma``...)."""
        image_size = int(flags.get("image_size", 64))
        mult = str(flags.get("channel_mult", ""))
        if mult:
            channel_mult = tuple(float(m) if "." in m else int(m) for m in mult.split(","))
        else:
            defaults = {
                512: (0.5, 1, 1, 2, 2, 4, 4),
                256: (1, 1, 2, 2, 4, 4),
                128: (1, 1, 2, 3, 4),
                64: (1, 2, 3, 4),
            }
            if image_size not in defaults:
                raise ValueError(f"no default channel_mult for image_size {image_size}")
            channel_mult = defaults[image_size]
        attn = str(flags.get("attention_resolutions", "16,8"))
        attention_resolutions = tuple(image_size // int(r) for r in attn.split(",") if r)
        return cls(
            image_size=image_size,
            in_channels=3,
            model_channels=int(flags.get("num_channels", 128)),
            out_channels=6 if flags.get("learn_sigma", False) else 3,
            num_res_blocks=int(flags.get("num_res_blocks", 2)),
            attention_resolutions=attention_resolutions,
            dropout=float(flags.get("dropout", 0.0)),
            channel_mult=channel_mult,
            num_classes=1000 if flags.get("class_cond", False) else None,
            num_heads=int(flags.get("num_heads", 4)),
            num_head_channels=int(flags.get("num_head_channels", -1)),
            num_heads_upsample=int(flags.get("num_heads_upsample", -1)),
            use_scale_shift_norm=bool(flags.get("use_scale_shift_norm", True)),
            resblock_updown=bool(flags.get("resblock_updown", False)),
            use_new_attention_order=bool(flags.get("use_new_attention_order", False)),
        )
