"""Threat models: L-infinity and L2 balls intersected with the image box [0, 1].

Images are ``(B, C, H, W)`` tensors in [0, 1]; every method works per sample.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["ThreatModel"]

_NORMS = ("Linf", "L2")


def _per_sample_l2(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1).reshape(v.shape[0], *([1] * (v.dim() - 1)))


class ThreatModel:
    """The set ``{x' : ||x' - x||_p <= eps, 0 <= x' <= 1}`` around each clean image ``x``.

    Args:
        norm: ``"Linf"`` or ``"L2"`` (norm over all ``C*H*W`` entries of one image).
        eps: radius (paper: 8/255 for Linf, 0.5 for L2 on CIFAR-10).
    """

    def __init__(self, norm: str = "Linf", eps: float = 8 / 255) -> None:
        if norm not in _NORMS:
            raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if norm == "Linf" and eps > 1:
            raise ValueError(f"an Linf radius must be <= 1 (images in [0, 1]), got {eps}")
        self.norm = norm
        self.eps = float(eps)

    def __repr__(self) -> str:
        return f"ThreatModel(norm={self.norm!r}, eps={self.eps!r})"

    def config(self) -> dict:
        return {"norm": self.norm, "eps": self.eps}

    def distance(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """``(B,)`` distances ``||x_adv - x||`` in this threat model's norm."""
        d = (x_adv - x).flatten(1)
        return d.abs().amax(dim=1) if self.norm == "Linf" else d.norm(dim=1)

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Map ``x_adv`` into the ball around ``x``, then into [0, 1].

        Clipping to the box after the ball projection keeps the point in the ball: every
        coordinate only moves towards ``x_i``, which lies in [0, 1].
        """
        delta = x_adv - x
        if self.norm == "Linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            n = _per_sample_l2(delta)
            delta = delta * torch.clamp(self.eps / n.clamp_min(1e-12), max=1.0)
        return (x + delta).clamp(0.0, 1.0)

    def direction(self, grad: Tensor) -> Tensor:
        """Steepest-ascent direction of unit norm: ``sign(g)`` (Linf) or ``g / ||g||_2`` (L2)."""
        if self.norm == "Linf":
            return grad.sign()
        return grad / _per_sample_l2(grad).clamp_min(1e-12)

    def random_start(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """A random point of the threat model around ``x``: uniform in the Linf cube, or a
        uniformly random direction with radius ``eps * U(0, 1)`` for L2."""
        if self.norm == "Linf":
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            delta = (2.0 * u - 1.0) * self.eps
        else:
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            r = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
            delta = z / _per_sample_l2(z).clamp_min(1e-12) * (r * self.eps).reshape(
                -1, *([1] * (x.dim() - 1))
            )
        return self.project(x + delta, x)

    def contains(self, x_adv: Tensor, x: Tensor, tol: float = 1e-5) -> Tensor:
        """``(B,)`` bool: ``x_adv`` lies in the ball (up to ``tol``) and in [0, 1]."""
        inside = self.distance(x_adv, x) <= self.eps + tol
        box = (x_adv.flatten(1).amin(1) >= 0.0) & (x_adv.flatten(1).amax(1) <= 1.0)
        return inside & box
