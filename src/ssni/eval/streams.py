"""Random streams of an evaluation, keyed by integers such as ``(seed, chunk start, phase)``.

Keys make results independent of batching order and restarts: the same key always gives the same
stream, and different keys give independent streams (``numpy.random.SeedSequence``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["keyed_generator", "seeded_generator", "device_of"]


def keyed_generator(device: torch.device, *key: int) -> torch.Generator:
    """A generator on ``device`` seeded from the integers ``key`` (independent streams)."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def seeded_generator(seed: int, device="cpu") -> torch.Generator:
    """A generator on ``device`` seeded with the one integer ``seed`` (``manual_seed``)."""
    return torch.Generator(device=device).manual_seed(int(seed))


def device_of(module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (CPU if it has none)."""
    if isinstance(module, nn.Module):
        for p in module.parameters():
            return p.device
        for b in module.buffers():
            return b.device
    return torch.device("cpu")
