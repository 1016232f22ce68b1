"""The score-model contract and its adapters.

Every score model maps model-space images ``x`` in [-1, 1] of shape ``(B, C, H, W)`` and
continuous times ``t`` of shape ``(B,)`` to the predicted noise ``eps(x, t)`` (same shape as
``x``); the score is ``s(x, t) = -eps(x, t) / sigma(t)`` (Song et al. 2021, eq. for VP).
New checkpoint families are new adapters (subclasses of :class:`ScoreModel`), never branches.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .diffusion import VPSchedule, expand_like, safe_sqrt

__all__ = ["ScoreModel", "EpsilonNetwork", "GaussianScore", "NetworkCalls", "count_network_calls"]


class ScoreModel(nn.Module):
    """Contract: ``eps(x, t)`` and ``score(x, t)`` with the VP ``schedule`` they refer to.

    Subclasses implement :meth:`eps`. ``forward`` is ``eps``. ``image_shape`` is the
    ``(C, H, W)`` of the images the model was trained on when known (loaders set it; inputs of
    another shape are refused by the purifiers), ``None`` when any shape works.
    """

    image_shape: Optional[Tuple[int, int, int]] = None

    def __init__(self, schedule: Optional[VPSchedule] = None) -> None:
        super().__init__()
        self.schedule = schedule if schedule is not None else VPSchedule()

    def eps(self, x: Tensor, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.eps(x, t)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """``-eps(x, t) / sigma(t)``; ``t`` must be > 0."""
        return -self.eps(x, t) / expand_like(self.schedule.sigma(t), x)


class EpsilonNetwork(ScoreModel):
    """Adapter for an epsilon-prediction network ``net(x, label)``.

    The label given to the network is ``t * time_scale - time_offset`` (rounded first when
    ``integer_time``), never below 0. Each checkpoint family gets the label it was trained with:
    score_sde's continuous models ``999 t`` (scale 999, offset 0); discrete DDPMs
    (guided-diffusion, diffusers) were trained with the 0-based index ``k - 1`` for
    ``alpha_bar_k = prod_{j <= k} (1 - beta_j)``, i.e. ``t = k / 1000`` gets label ``k - 1``
    (scale 1000, ``integer_time=True``, offset 1).

    Args:
        net: module called as ``net(x, label)`` with ``label`` of shape ``(B,)``.
        schedule: the VP schedule the network was trained with.
        time_scale: multiplier from ``t`` in [0, 1] to the network's time label.
        integer_time: round the label to an integer (discrete-time networks).
        out_channels: keep only the first ``out_channels`` output channels (drops learned
            variance channels of guided-diffusion models); ``None`` keeps them all.
        accelerate: on CUDA inputs, run the network under bf16 autocast, in channels_last
            memory format and compiled with ``torch.compile`` (dynamic shapes: active sets vary);
            the output is cast back to the input's dtype. Inputs on other devices take the plain
            path, so CPU results do not change.
        time_offset: subtracted from the (rounded) label; 1 for 0-based discrete checkpoints.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: Optional[VPSchedule] = None,
        *,
        time_scale: float = 999.0,
        integer_time: bool = False,
        out_channels: Optional[int] = None,
        time_offset: float = 0.0,
        accelerate: bool = False,
    ) -> None:
        super().__init__(schedule)
        self.net = net
        self.time_scale = float(time_scale)
        self.integer_time = bool(integer_time)
        self.out_channels = out_channels
        self.time_offset = float(time_offset)
        self.accelerate = bool(accelerate)
        self._compiled = None

    def _fast_net(self, x: Tensor, label: Tensor) -> Tensor:
        if self._compiled is None:
            self.net.to(memory_format=torch.channels_last)
            # not registered as a submodule: the state_dict keeps its keys
            object.__setattr__(self, "_compiled", torch.compile(self.net, dynamic=True))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = self._compiled(x.contiguous(memory_format=torch.channels_last), label)
        return out.to(x.dtype).contiguous()

    def labels(self, t: Tensor) -> Tensor:
        """``(B,)`` time labels given to the network for levels ``t`` ``(B,)``."""
        label = t * self.time_scale
        if self.integer_time:
            label = torch.round(label.detach())
        if self.time_offset:
            label = (label - self.time_offset).clamp_min(0.0)
        return label

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        label = self.labels(t.to(x.dtype))
        if self.accelerate and x.is_cuda:
            out = self._fast_net(x, label)
        else:
            out = self.net(x, label)
        if self.out_channels is not None:
            out = out[:, : self.out_channels]
        return out


class GaussianScore(ScoreModel):
    """Exact eps for data ``x0 ~ N(mean, std^2 I)`` in model space.

    ``x_t ~ N(sqrt(a) mean, a std^2 + 1 - a)`` with ``a = alpha_bar(t)``, hence
    ``eps(x, t) = sigma(t) (x - sqrt(a) mean) / (a std^2 + 1 - a)``.
    ``mean`` and ``std`` may be floats or tensors broadcastable to one image ``(C, H, W)``.
    """

    def __init__(
        self,
        mean: Union[float, Tensor] = 0.0,
        std: Union[float, Tensor] = 0.5,
        schedule: Optional[VPSchedule] = None,
    ) -> None:
        super().__init__(schedule)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        if (self.std <= 0).any():
            raise ValueError("GaussianScore needs std > 0")

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        a = expand_like(self.schedule.alpha_bar(t), x)
        mean = self.mean.to(x.dtype)
        var = self.std.to(x.dtype) ** 2
        return safe_sqrt(1.0 - a) * (x - a.sqrt() * mean) / (a * var + 1.0 - a)


class NetworkCalls:
    """Counts of score-network calls: ``calls`` (invocations of ``eps``) and ``images`` (images
    evaluated, the sum of the batch sizes; recomputations of checkpointed calls included)."""

    def __init__(self) -> None:
        self.calls = 0
        self.images = 0

    def __repr__(self) -> str:
        return f"NetworkCalls(calls={self.calls}, images={self.images})"


def _score_models(objects) -> list:
    found = []
    for obj in objects:
        if isinstance(obj, nn.Module):
            found += [m for m in obj.modules() if isinstance(m, ScoreModel)]
    unique = []
    for m in found:
        if all(m is not u for u in unique):
            unique.append(m)
    return unique


@contextlib.contextmanager
def count_network_calls(*objects) -> Iterator[NetworkCalls]:
    """Count the ``eps`` calls of every :class:`ScoreModel` inside the given modules while the
    block runs (non-module arguments are ignored)::

        with count_network_calls(defense) as calls:
            defense(x)
        calls.images / x.shape[0]   # network evaluations per image
    """
    counter = NetworkCalls()
    models = _score_models(objects)
    saved = [m.__dict__.get("eps") for m in models]
    for m in models:
        inner = m.eps

        def counted(x, t, _inner=inner):
            counter.calls += 1
            counter.images += int(x.shape[0])
            return _inner(x, t)

        m.eps = counted
    try:
        yield counter
    finally:
        for m, own in zip(models, saved):
            if own is None:
                del m.eps
            else:
                m.eps = own
