"""A purification defense: ``classifier(purifier(x, policy(x)))``."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from .policies import NoiseLevelPolicy
from .purifiers import Purifier
from .validation import check_images, check_model_input

__all__ = ["Defense", "DefenseOutput"]


class DefenseOutput(NamedTuple):
    """``logits`` ``(B, classes)``; ``t`` levels ``(B,)``; ``purified`` images; ``nfe`` ``(B,)``."""

    logits: Tensor
    t: Tensor
    purified: Tensor
    nfe: Tensor


class Defense(nn.Module):
    """Diffusion-based purification in front of a classifier.

    ``t = policy(x)`` -> ``x_pure = purifier(x, t)`` -> ``logits = classifier(x_pure)``.
    The classifier takes images in [0, 1] (fold any normalisation into it).
    ``forward`` is differentiable w.r.t. ``x`` (through the purifier; through ``t`` only if the
    policy is differentiable). Each call draws fresh noise unless a ``generator`` is given.
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

    def run(self, x: Tensor, generator: Optional[torch.Generator] = None) -> DefenseOutput:
        """Every intermediate of one stochastic pass."""
        self._check(x)
        t = self.policy(x, generator=generator)
        pure = self.purifier.run(x, t, generator=generator)
        return DefenseOutput(self.classifier(pure.x), t, pure.x, pure.nfe)

    def purify(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Purified images ``(B, C, H, W)`` in [0, 1]."""
        self._check(x)
        return self.purifier(x, self.policy(x, generator=generator), generator=generator)

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Logits ``(B, classes)`` of one stochastic pass."""
        return self.classifier(self.purify(x, generator=generator))

    @torch.no_grad()
    def predict(
        self, x: Tensor, votes: int = 1, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Majority vote ``(B,)`` over ``votes`` stochastic passes (ties: smallest label)."""
        if votes < 1:
            raise ValueError(f"votes must be >= 1, got {votes}")
        counts = None
        for _ in range(votes):
            logits = self.forward(x, generator=generator)
            onehot = torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1])
            counts = onehot if counts is None else counts + onehot
        return counts.argmax(1)
