"""Differentiable structural similarity (SSIM, Wang et al. 2004) with a Gaussian window.

Used as GDMP's optional guidance distance. Everything is plain tensor algebra (a depthwise
convolution), so gradients of any order flow through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gaussian_window", "ssim_map", "ssim"]


def gaussian_window(size: int = 11, sigma: float = 1.5, *, dtype=None, device=None) -> Tensor:
    """Normalised 2-D Gaussian window ``(size, size)`` summing to 1."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be a positive odd integer, got {size}")
    if not sigma > 0:
        raise ValueError(f"window sigma must be > 0, got {sigma}")
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r * r) / (2.0 * sigma * sigma))
    g = g / g.sum()
    return torch.outer(g, g).to(dtype=dtype or torch.get_default_dtype(), device=device)


def ssim_map(
    x: Tensor,
    y: Tensor,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
) -> Tensor:
    """Local SSIM index of ``x`` and ``y`` (both ``(B, C, H, W)``), same shape, values in [-1, 1].

    Local means, variances and covariance are Gaussian-weighted (``window_size``, ``sigma``;
    zero padding, one window per channel); ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` with
    ``L = data_range`` (1 for [0, 1] images, 2 for [-1, 1] model space).
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    channels = x.shape[1]
    w = gaussian_window(window_size, sigma, dtype=x.dtype, device=x.device)
    w = w.expand(channels, 1, window_size, window_size)
    pad = window_size // 2

    def blur(v: Tensor) -> Tensor:
        return F.conv2d(v, w, padding=pad, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return num / den


def ssim(
    x: Tensor,
    y: Tensor,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
) -> Tensor:
    """Mean SSIM per image, ``(B,)`` (1 for identical images); see :func:`ssim_map`."""
    m = ssim_map(x, y, window_size=window_size, sigma=sigma, data_range=data_range)
    return m.flatten(1).mean(1)
