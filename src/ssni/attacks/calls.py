"""Count network calls of an attack: images passed through given modules (forward hooks)."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Mapping

from torch import nn

from .base import Attack
from .gradients import GradientEstimator

__all__ = ["count_calls", "Counted"]


@contextlib.contextmanager
def count_calls(modules: Mapping[str, nn.Module]) -> Iterator[Dict[str, int]]:
    """Within the block, ``counts[name]`` is the number of images (first dimension of the
    first input) that went through ``modules[name]``'s forward. Backward passes are not
    counted; a network evaluation with gradients counts once."""
    counts = {name: 0 for name in modules}
    handles = []
    for name, module in modules.items():
        def hook(_module, args, _name=name):
            if args and hasattr(args[0], "shape") and args[0].dim() > 0:
                counts[_name] += int(args[0].shape[0])
        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


class Counted(Attack):
    """``attack`` unchanged, with ``last_stats["network_calls"]`` = ``{name: images per input
    image}`` through each of ``modules`` (e.g. the score network and the classifier) during the
    attack. Its configuration is the wrapped attack's: counting does not change the attack."""

    def __init__(self, attack: Attack, modules: Mapping[str, nn.Module]) -> None:
        self.attack = attack
        self.modules = dict(modules)
        self.threat = attack.threat
        self.loss = attack.loss
        self.gradient = attack.gradient
        self.last_stats = None

    @property
    def passes(self) -> int:
        return self.attack.passes

    def with_gradient(self, gradient: GradientEstimator) -> Counted:
        return Counted(self.attack.with_gradient(gradient), self.modules)

    def config(self) -> dict:
        return self.attack.config()

    def __repr__(self) -> str:
        return f"Counted({self.attack!r})"

    def __call__(self, model, x, y, generator=None):
        with count_calls(self.modules) as counts:
            x_adv = self.attack(model, x, y, generator)
        stats = dict(self.attack.last_stats or {})
        stats["network_calls"] = {k: v / x.shape[0] for k, v in counts.items()}
        self.last_stats = stats
        return x_adv
