"""The variance-preserving (VP) diffusion process.

Time is continuous, ``t`` in [0, 1], always a ``(B,)`` tensor (one level per sample). The paper's
"t* = 100" (step 100 of N = 1000) is ``t = 0.1``.

Two equivalent parametrisations are offered (Ho et al. 2020; Song et al. 2021):

* continuous VP-SDE, ``beta(t) = beta_min + t (beta_max - beta_min)``,
  ``alpha_bar(t) = exp(-beta_min t - (beta_max - beta_min) t^2 / 2)``;
* discrete DDPM linear schedule, ``beta_i`` from ``beta_min / N`` to ``beta_max / N``,
  ``alpha_bar_i = prod_{j <= i} (1 - beta_j)``; between grid points ``log alpha_bar`` is
  interpolated linearly so that it stays differentiable in ``t``.

On the ``1/1000`` grid their ``alpha_bar`` differ by at most 8.1e-4 (at ``t = 0.141``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["VPSchedule", "safe_sqrt", "expand_like"]


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(max(x, 0))`` whose gradient is finite (zero) at and below 0."""
    return x.clamp_min(1e-20).sqrt()


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a ``(B,)`` tensor to broadcast against ``x`` of shape ``(B, ...)``."""
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1)))


class VPSchedule:
    """VP noise schedule in continuous time ``t`` in [0, 1].

    Args:
        beta_min, beta_max: endpoints of ``beta(t)`` (defaults 0.1 and 20, i.e. DDPM's 1e-4 to
            2e-2 over 1000 steps).
        num_steps: N, the size of the discrete grid; ``t`` values are quantised to ``1 / N``
            by policies, and ``discrete=True`` uses the DDPM product formula on that grid.
        discrete: use the DDPM discrete ``alpha_bar`` (what ``beta`` linear DDPM checkpoints
            were trained with) instead of the continuous VP-SDE closed form.
    """

    def __init__(
        self,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        num_steps: int = 1000,
        discrete: bool = False,
    ) -> None:
        if not (0 <= beta_min < beta_max):
            raise ValueError(f"need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.num_steps = int(num_steps)
        self.discrete = bool(discrete)
        betas = torch.linspace(
            beta_min / num_steps, beta_max / num_steps, num_steps, dtype=torch.float64
        )
        log_ab = torch.cumsum(torch.log1p(-betas), 0)
        self._log_alpha_bar_grid = torch.cat([torch.zeros(1, dtype=torch.float64), log_ab])

    def __repr__(self) -> str:
        kind = "discrete" if self.discrete else "continuous"
        return (
            f"VPSchedule(beta_min={self.beta_min}, beta_max={self.beta_max}, "
            f"num_steps={self.num_steps}, {kind})"
        )

    def config(self) -> dict:
        return {
            "beta_min": self.beta_min,
            "beta_max": self.beta_max,
            "num_steps": self.num_steps,
            "discrete": self.discrete,
        }

    def beta(self, t: Tensor) -> Tensor:
        """Instantaneous ``beta(t)`` of the VP-SDE, shape of ``t``."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        """``log alpha_bar(t)``, differentiable in ``t``; shape of ``t``."""
        if not self.discrete:
            return -self.beta_min * t - 0.5 * (self.beta_max - self.beta_min) * t * t
        grid = self._log_alpha_bar_grid.to(device=t.device, dtype=t.dtype)
        pos = t.clamp(0.0, 1.0) * self.num_steps
        lo = pos.detach().floor().clamp(0, self.num_steps - 1)
        frac = pos - lo
        lo = lo.long()
        return grid[lo] + frac * (grid[lo + 1] - grid[lo])

    def alpha_bar(self, t: Tensor) -> Tensor:
        """Signal power ``alpha_bar(t)`` in (0, 1]; shape of ``t``."""
        return torch.exp(self.log_alpha_bar(t))

    def sigma(self, t: Tensor) -> Tensor:
        """Noise std ``sqrt(1 - alpha_bar(t))``; shape of ``t``."""
        return safe_sqrt(-torch.expm1(self.log_alpha_bar(t)))

    def perturb(
        self,
        x0: Tensor,
        t: Tensor,
        generator: Optional[torch.Generator] = None,
        noise: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Forward diffusion ``x_t = sqrt(alpha_bar(t)) x0 + sigma(t) z``.

        Args:
            x0: ``(B, C, H, W)`` in model space [-1, 1].
            t: ``(B,)`` levels in [0, 1].
            generator: source of ``z ~ N(0, I)`` (ignored when ``noise`` is given).
            noise: optional explicit ``z`` of the shape of ``x0``.

        Returns:
            ``(x_t, z)``.
        """
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        a = expand_like(self.alpha_bar(t), x0)
        return a.sqrt() * x0 + safe_sqrt(1.0 - a) * noise, noise

    def quantize(self, t: Tensor) -> Tensor:
        """Round ``t`` to the ``1 / num_steps`` grid."""
        return torch.round(t * self.num_steps) / self.num_steps
