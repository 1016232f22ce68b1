"""What an attack is aimed at: the model whose gradient is taken and the model that is judged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

__all__ = ["AttackTarget"]


@dataclass(frozen=True)
class AttackTarget:
    """``judged``: the defense whose predictions count (clean and robust accuracy).
    ``gradient``: the model the attack is called with, ``attack(target.gradient, x, y, gen)``,
    whose input gradients (or its estimator's) drive the attack: the defense itself, or a
    variant such as ``bpda(defense)`` / ``full(defense)`` / ``relaxed(defense)``.
    (A :class:`~ssni.attacks.Surrogate` estimator brings its own cheaper model; it still judges
    its losses on the model the attack is called with.)
    """

    judged: nn.Module
    gradient: nn.Module

    @classmethod
    def of(cls, model, surrogate: Optional[nn.Module] = None) -> AttackTarget:
        """``model`` if it is a target already, else ``AttackTarget(model, surrogate or
        model)``."""
        if isinstance(model, AttackTarget):
            if surrogate is not None:
                raise ValueError("pass either an AttackTarget or a surrogate, not both")
            return model
        return cls(model, model if surrogate is None else surrogate)

    @property
    def distinct(self) -> bool:
        """Whether the gradient model is another model than the judged one."""
        return self.gradient is not self.judged
