"""Policy-aware pieces for attacks on SSNI: a clean-norm target and a penalty loss.

An attacker who knows SSNI (Sun et al., ICML 2025) wants ``x_adv`` that fools the classifier after
purification *and* keeps the EPS score norm ``e(x_adv)`` low, so that the policy assigns it the
small level of a clean-looking input. :class:`NormPenaltyLoss` is the classification loss minus a
hinge on ``e(x)`` above a target (by default the clean 90th percentile, :func:`clean_norm_target`).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .losses import CrossEntropy, Loss

__all__ = ["clean_norm_target", "normal_quantile", "NormPenaltyLoss"]


def normal_quantile(q: float) -> float:
    """``Phi^{-1}(q)`` for ``q`` in (0, 1) (standard normal quantile, by bisection on erf)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def clean_norm_target(policy, quantile: float = 0.9) -> float:
    """The ``quantile`` of the clean EPS norms, from the policy's clean statistics under a
    normal approximation, ``mu + Phi^{-1}(q) std`` (clipped to the clean ``[min, max]``)."""
    stats = policy.statistics()
    value = stats["mean"] + normal_quantile(quantile) * stats["std"]
    return float(min(max(value, stats["min"]), stats["max"]))


class NormPenaltyLoss:
    """``base(logits, y) - lam * relu(e(x) - target) / std`` per sample (maximised).

    With a large ``lam`` the gradient is that of the base loss while ``e(x) <= target`` and is
    dominated by the descent direction of ``e(x)`` above it: a projection-like penalty that keeps
    the input inside the low-norm region. ``lam`` is a float or a ``(B,)`` tensor (an attack may
    adapt it per sample). After each call ``last_norm`` holds the detached ``(B,)`` norms.

    Args:
        policy: a fitted :class:`ssni.SSNI` or :class:`ssni.LearnedPolicy` (its probe
            ``score_norm`` and clean ``statistics()``).
        target: norm threshold in raw units (None: :func:`clean_norm_target` of ``quantile``).
        lam: penalty weight >= 0.
        base: classification loss (default cross-entropy).
        quantile: clean quantile used when ``target`` is None.
    """

    def __init__(
        self,
        policy,
        target: Optional[float] = None,
        *,
        lam: Union[float, Tensor] = 10.0,
        base: Optional[Loss] = None,
        quantile: float = 0.9,
    ) -> None:
        if isinstance(lam, (int, float)) and not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.policy = policy
        self.target = float(clean_norm_target(policy, quantile) if target is None else target)
        self.lam = lam
        self.base = base if base is not None else CrossEntropy()
        self.last_norm: Optional[Tensor] = None
        base_name = getattr(self.base, "name", self.base)
        self.name = f"norm_penalty(target={self.target:.4g}, base={base_name})"

    def __repr__(self) -> str:
        return f"NormPenaltyLoss(target={self.target:.4g}, base={self.base!r})"

    def __call__(
        self, logits: Tensor, y: Tensor, x: Optional[Tensor] = None, generator=None
    ) -> Tensor:
        if x is None:
            raise ValueError("NormPenaltyLoss needs the input x")
        base = self.base(logits, y, x, generator)
        e = self.policy.score_norm(x, generator=generator)
        self.last_norm = e.detach()
        std = self.policy.statistics()["std"] or 1.0
        lam = self.lam
        if isinstance(lam, Tensor):
            lam = lam.to(device=e.device, dtype=e.dtype)
        return base - lam * torch.relu(e - self.target) / std
