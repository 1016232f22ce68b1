"""Per-sample attack losses ``loss(logits, y, x=None, generator=None) -> (B,)`` (maximised).

``logits`` is ``(B, classes)``, ``y`` ``(B,)`` int64 labels, ``x`` the ``(B, C, H, W)`` input in
[0, 1] that produced the logits (used by :class:`ScoreNormLoss`).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch.nn.functional as F
from torch import Tensor

__all__ = ["CrossEntropy", "DLR", "ScoreNormLoss", "make_loss", "Loss"]

Loss = Callable[..., Tensor]


class CrossEntropy:
    """Cross-entropy of the true class, per sample."""

    name = "ce"

    def __call__(
        self, logits: Tensor, y: Tensor, x: Optional[Tensor] = None, generator=None
    ) -> Tensor:
        return F.cross_entropy(logits, y, reduction="none")

    def __repr__(self) -> str:
        return "CrossEntropy()"


class DLR:
    """Difference of logits ratio (Croce & Hein 2020), untargeted, per sample:
    ``-(z_y - max_{i != y} z_i) / (z_(1) - z_(3) + 1e-12)`` with ``z_(k)`` the k-th largest logit.
    Needs at least three classes."""

    name = "dlr"

    def __call__(
        self, logits: Tensor, y: Tensor, x: Optional[Tensor] = None, generator=None
    ) -> Tensor:
        if logits.shape[1] < 3:
            raise ValueError("the DLR loss needs at least 3 classes")
        top = logits.sort(dim=1, descending=True).values
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf"))
        z_other = others.amax(dim=1)
        return -(z_y - z_other) / (top[:, 0] - top[:, 2] + 1e-12)

    def __repr__(self) -> str:
        return "DLR()"


class ScoreNormLoss:
    """Score-norm-aware loss for attacks on SSNI: ``base(logits, y) - lam * (e(x) - mu) / std``.

    Maximising it raises the classification loss while lowering the input's EPS score norm
    ``e(x)`` (standardised with the policy's clean statistics), so that the adversarial input
    looks clean to the SSNI policy and receives less noise. The gradient of ``e(x)`` w.r.t. ``x``
    is exact (the probe is differentiated whatever the policy's ``differentiable`` flag).

    Args:
        policy: a fitted :class:`ssni.SSNI` policy (provides ``score_norm`` and statistics).
        lam: weight ``lambda`` >= 0 of the standardised score norm.
        base: classification loss (default cross-entropy).
    """

    def __init__(self, policy, lam: float = 1.0, base: Optional[Loss] = None) -> None:
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.policy = policy
        self.lam = float(lam)
        self.base = base if base is not None else CrossEntropy()
        self.name = f"score_norm(lam={self.lam}, base={getattr(self.base, 'name', self.base)})"

    def __repr__(self) -> str:
        return f"ScoreNormLoss(lam={self.lam}, base={self.base!r})"

    def __call__(
        self, logits: Tensor, y: Tensor, x: Optional[Tensor] = None, generator=None
    ) -> Tensor:
        if x is None:
            raise ValueError("ScoreNormLoss needs the input x")
        base = self.base(logits, y, x, generator)
        if self.lam == 0:
            return base
        e = self.policy.score_norm(x, generator=generator)
        stats = self.policy.statistics()
        std = stats["std"] if stats["std"] > 0 else 1.0
        return base - self.lam * (e - stats["mean"]) / std


def make_loss(loss: Union[str, Loss]) -> Loss:
    """``"ce"`` or ``"dlr"`` by name; a callable is returned unchanged."""
    if callable(loss):
        return loss
    if loss == "ce":
        return CrossEntropy()
    if loss == "dlr":
        return DLR()
    raise ValueError(f"unknown loss {loss!r}; expected 'ce', 'dlr' or a callable")


