"""Input checks at the public boundary: each raises ``ValueError`` saying what was expected."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["check_images", "check_model_input", "check_times", "as_times"]


def check_images(x: Tensor, name: str = "x") -> Tensor:
    """Require a finite ``(B, C, H, W)`` float tensor with values in [0, 1]."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(x)}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(x.detach().min()), float(x.detach().max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name} must be images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return x


def check_model_input(
    x: Tensor, model: Optional[nn.Module], what: str, name: str = "x"
) -> Tensor:
    """Require images ``x`` that ``model`` can take: its ``image_shape`` ``(C, H, W)`` when it
    declares one, and the dtype of its floating-point parameters (no check for ``None``)."""
    if not isinstance(model, nn.Module):
        return x
    shape = getattr(model, "image_shape", None)
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        got = "x".join(str(v) for v in x.shape[1:])
        want = "x".join(str(v) for v in shape)
        raise ValueError(
            f"{name} holds {got} images (C x H x W); the {what} expects {want} images"
        )
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None and x.dtype != param.dtype:
        raise ValueError(
            f"{name} is {x.dtype}, the {what}'s weights are {param.dtype}; convert the images "
            f"(e.g. x.to({param.dtype}))"
        )
    return x


def as_times(t: Union[float, Tensor], like: Tensor) -> Tensor:
    """Turn a float or ``(B,)`` tensor into ``(B,)`` times on ``like``'s device and dtype."""
    if not isinstance(t, Tensor):
        t = torch.full((like.shape[0],), float(t), device=like.device, dtype=like.dtype)
    return check_times(t.to(device=like.device, dtype=like.dtype), like.shape[0])


def check_times(t: Tensor, batch: int, name: str = "t") -> Tensor:
    """Require finite ``(batch,)`` times in [0, 1]."""
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(
            f"{name} must have shape ({batch},), one level per sample, got {tuple(t.shape)}"
        )
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(t.detach().min()), float(t.detach().max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name} must lie in [0, 1] (t* = 100 of 1000 steps is 0.1), got [{lo:.4g}, {hi:.4g}]"
        )
    return t
