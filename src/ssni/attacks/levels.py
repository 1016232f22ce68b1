"""Attack the defense at the levels a clean input gets, then transfer to the real policy.

SSNI gives clean-looking inputs a small level ``t(x)``. An attacker can optimise against the
purifier run at levels drawn from the clean ``t(x)`` histogram (EOT over ``t``), hoping that the
example transfers to the real policy. :class:`SampledLevels` is that policy: every call draws one
level per sample from a fixed list (e.g. the policy's levels on held-out clean images);
:func:`at_levels` builds the defense that uses it.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..core.defense import Defense
from ..core.policies import NoiseLevelPolicy
from ..core.validation import check_images

__all__ = ["SampledLevels", "at_levels", "clean_levels"]


class SampledLevels(NoiseLevelPolicy):
    """Levels ``(B,)`` drawn uniformly with replacement from ``levels`` (values in [0, 1]), one per
    sample and call, from ``generator`` when given: EOT over the clean-level distribution."""

    def __init__(self, levels: Union[Sequence[float], Tensor]) -> None:
        super().__init__()
        t = torch.as_tensor(levels, dtype=torch.float32).flatten()
        if t.numel() == 0:
            raise ValueError("SampledLevels needs at least one level")
        if bool(((t < 0) | (t > 1)).any()):
            raise ValueError("levels must lie in [0, 1]")
        self.register_buffer("levels", t)

    def extra_repr(self) -> str:
        return f"levels={self.levels.numel()}, mean={float(self.levels.mean()):.4g}"

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        check_images(x)
        idx = torch.randint(
            self.levels.numel(), (x.shape[0],), generator=generator, device=x.device
        )
        return self.levels.to(device=x.device, dtype=x.dtype)[idx]


def at_levels(defense: Defense, levels: Union[Sequence[float], Tensor]) -> Defense:
    """``defense`` with its policy replaced by :class:`SampledLevels` over ``levels``."""
    return defense.variant(policy=SampledLevels(levels))


@torch.no_grad()
def clean_levels(policy, x: Tensor, generator: Optional[torch.Generator] = None,
                 batch_size: int = 64) -> Tensor:
    """Levels ``(N,)`` that ``policy`` assigns to clean images ``x`` (use held-out images)."""
    out = [policy(x[i : i + batch_size], generator=generator) for i in range(0, x.shape[0],
                                                                             batch_size)]
    return torch.cat(out)
