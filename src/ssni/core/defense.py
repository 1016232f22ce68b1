"""A purification defense: ``classifier(purifier(x, policy(x)))``."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from .policies import NoiseLevelPolicy
from .purifiers import Purifier, StraightThrough
from .validation import check_images, check_model_input
from .variants import variant

__all__ = ["Defense", "DefenseOutput", "majority_vote"]


def majority_vote(labels: Tensor, classes: int) -> Tensor:
    """``labels`` ``(P, B)`` int64 predictions of ``P`` passes -> ``(B,)`` majority label
    (ties: the smallest label)."""
    counts = torch.nn.functional.one_hot(labels, classes).sum(0)
    return counts.argmax(1)


class DefenseOutput(NamedTuple):
    """``logits`` ``(B, classes)``; ``t`` levels ``(B,)``; ``purified`` images; ``nfe`` ``(B,)``;
    ``score_norm`` the EPS norms ``(B,)`` that gave ``t`` (None for policies without one)."""

    logits: Tensor
    t: Tensor
    purified: Tensor
    nfe: Tensor
    score_norm: Optional[Tensor] = None


class Defense(nn.Module):
    """Diffusion-based purification in front of a classifier.

    ``t = policy(x)`` -> ``x_pure = purifier(x, t)`` -> ``logits = classifier(x_pure)``.
    The classifier takes images in [0, 1] (fold any normalisation into it).
    ``forward`` is differentiable w.r.t. ``x`` (through the purifier; through ``t`` only if the
    policy is differentiable). Each call draws fresh noise unless a ``generator`` is given.
    ``run``, ``purify`` and ``forward`` take optional levels ``t`` ``(B,)``: the policy is then
    skipped (an attack computes ``t(x)`` once per gradient estimate and shares it across its EOT
    passes, as the SSNI reference does).
    """

    def __init__(self, classifier: nn.Module, purifier: Purifier, policy: NoiseLevelPolicy) -> None:
        super().__init__()
        self.classifier = classifier
        self.purifier = purifier
        self.policy = policy

    def _check(self, x: Tensor) -> None:
        check_images(x)
        check_model_input(x, getattr(self.purifier, "model", None), "score model")
        check_model_input(x, self.classifier, "classifier")

    def variant(
        self,
        *,
        purifier: Optional[Purifier] = None,
        policy: Optional[NoiseLevelPolicy] = None,
    ) -> Defense:
        """The same classifier with another purifier and/or policy (the others shared)."""
        return Defense(
            self.classifier,
            self.purifier if purifier is None else purifier,
            self.policy if policy is None else policy,
        )

    def straight_through(self) -> Defense:
        """BPDA: the purifier's backward is the identity (:class:`StraightThrough`); forward
        passes are unchanged."""
        if isinstance(self.purifier, StraightThrough):
            return self.variant()
        return self.variant(purifier=StraightThrough(self.purifier))

    def checkpointed(self) -> Defense:
        """Exact gradients through every reverse step with network calls recomputed
        (activation memory flat in the steps); needs a purifier with a ``checkpoint`` option."""
        if not hasattr(self.purifier, "checkpoint"):
            raise ValueError(
                f"{type(self.purifier).__name__} has no 'checkpoint' option; use DiffPure"
            )
        return self.variant(purifier=variant(self.purifier, checkpoint=True))

    def relaxed(self) -> Defense:
        """The policy made differentiable (soft level through the EPS norm, straight-through
        rounding); policies without that option are refused."""
        if not hasattr(self.policy, "differentiable"):
            raise ValueError(f"{type(self.policy).__name__} has no differentiable relaxation")
        return self.variant(policy=variant(self.policy, differentiable=True))

    def levels(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """The policy's levels ``(B,)`` for images ``x`` in [0, 1]."""
        self._check(x)
        return self.policy(x, generator=generator)

    def _levels(self, x: Tensor, generator, t: Optional[Tensor]) -> Tensor:
        if t is None:
            return self.policy(x, generator=generator)
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        return t

    def run(
        self,
        x: Tensor,
        generator: Optional[torch.Generator] = None,
        t: Optional[Tensor] = None,
    ) -> DefenseOutput:
        """Every intermediate of one stochastic pass (levels ``t`` from the policy if None, with
        the same random draws as ``forward``; ``score_norm`` is the policy's norm behind them)."""
        self._check(x)
        e = None
        levels_and_norms = getattr(self.policy, "levels_and_norms", None)
        if t is None and levels_and_norms is not None:
            t, e = levels_and_norms(x, generator=generator)
        else:
            t = self._levels(x, generator, t)
        pure = self.purifier.run(x, t, generator=generator)
        return DefenseOutput(self.classifier(pure.x), t, pure.x, pure.nfe, e)

    def purify(
        self,
        x: Tensor,
        generator: Optional[torch.Generator] = None,
        t: Optional[Tensor] = None,
    ) -> Tensor:
        """Purified images ``(B, C, H, W)`` in [0, 1] (levels ``t`` from the policy if None)."""
        self._check(x)
        return self.purifier(x, self._levels(x, generator, t), generator=generator)

    def forward(
        self,
        x: Tensor,
        generator: Optional[torch.Generator] = None,
        t: Optional[Tensor] = None,
    ) -> Tensor:
        """Logits ``(B, classes)`` of one stochastic pass (levels ``t`` from the policy if None)."""
        return self.classifier(self.purify(x, generator=generator, t=t))

    @torch.no_grad()
    def predict(
        self, x: Tensor, votes: int = 1, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Majority vote ``(B,)`` over ``votes`` stochastic passes (ties: smallest label)."""
        if votes < 1:
            raise ValueError(f"votes must be >= 1, got {votes}")
        labels, classes = [], 0
        for _ in range(votes):
            logits = self.forward(x, generator=generator)
            labels.append(logits.argmax(1))
            classes = logits.shape[1]
        return majority_vote(torch.stack(labels), classes)
