"""Gradient estimators handed to attacks (never copied into them).

An estimator is called as ``estimator(model, loss, x, y, generator=None, need_loss=True)`` and
returns a :class:`GradientEstimate`: the input gradient ``(B, C, H, W)`` of the per-sample loss
``loss(model(x), y, x)`` and, if ``need_loss``, the per-sample loss ``(B,)`` and logits
``(B, classes)`` the attack uses for bookkeeping. ``model`` is any module mapping images in
[0, 1] to logits; a ``generator`` is passed to it when its ``forward`` accepts one (a
:class:`ssni.Defense` does), so that stochastic passes are reproducible.

* :class:`EOT` -- expectation over transformation (Athalye et al. 2018): the mean gradient over
  ``n`` stochastic passes, one backward per pass, so memory holds one graph at a time.
* BPDA -- :func:`bpda` builds the defense with :class:`ssni.StraightThrough`, whose backward is the
  identity: the gradient is the classifier's gradient at the purified point.
* :class:`Surrogate` -- gradients of a cheaper copy of the defense (e.g. fewer reverse steps),
  losses and logits of the real one.
* full -- :func:`full` builds the defense with ``DiffPure(checkpoint=True)``: exact backprop
  through every reverse step with the network calls recomputed (memory flat in the steps).
* :func:`relaxed` -- the SSNI policy made differentiable (soft level, straight-through rounding),
  so gradients also flow through the EPS score norm.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..core.defense import Defense

__all__ = [
    "GradientEstimate",
    "GradientEstimator",
    "EOT",
    "Surrogate",
    "bpda",
    "full",
    "relaxed",
    "forward",
]


class GradientEstimate(NamedTuple):
    """``grad`` ``(B, C, H, W)``; ``loss`` ``(B,)`` and ``logits`` ``(B, K)`` (or None)."""

    grad: Tensor
    loss: Optional[Tensor]
    logits: Optional[Tensor]


def _takes_generator(model) -> bool:
    fn = model.forward if isinstance(model, nn.Module) else model
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "generator" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )


def forward(model, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """``model(x, generator=generator)`` if the model takes a generator, else ``model(x)``."""
    if generator is not None and _takes_generator(model):
        return model(x, generator=generator)
    return model(x)


class GradientEstimator:
    """Base class; ``passes`` is the number of stochastic passes per estimate."""

    passes: int = 1

    def __call__(
        self,
        model,
        loss,
        x: Tensor,
        y: Tensor,
        generator: Optional[torch.Generator] = None,
        need_loss: bool = True,
    ) -> GradientEstimate:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


def _one_pass(model, loss, x, y, generator):
    xi = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = forward(model, xi, generator)
        values = loss(logits, y, xi, generator)
        if values.requires_grad:
            (g,) = torch.autograd.grad(values.sum(), xi, allow_unused=True)
        else:
            g = None
    if g is None:
        g = torch.zeros_like(xi)
    return g, values.detach(), logits.detach()


class EOT(GradientEstimator):
    """Expectation over transformation: mean over ``n`` passes of the input gradient (and of
    the per-sample loss and logits). ``n = 1`` is the plain gradient of one pass."""

    def __init__(self, n: int = 20) -> None:
        if n < 1:
            raise ValueError(f"EOT needs n >= 1, got {n}")
        self.n = int(n)
        self.passes = self.n

    def __repr__(self) -> str:
        return f"EOT(n={self.n})"

    def config(self) -> dict:
        return {"estimator": "EOT", "n": self.n}

    def __call__(self, model, loss, x, y, generator=None, need_loss=True) -> GradientEstimate:
        grad = loss_sum = logit_sum = None
        for _ in range(self.n):
            g, v, z = _one_pass(model, loss, x, y, generator)
            if grad is None:
                grad, loss_sum, logit_sum = g, v, z
            else:
                grad, loss_sum, logit_sum = grad + g, loss_sum + v, logit_sum + z
        return GradientEstimate(grad / self.n, loss_sum / self.n, logit_sum / self.n)


class Surrogate(GradientEstimator):
    """Gradients from ``model`` (a cheaper copy of the defense, EOT over ``n`` passes); the loss
    and logits that the attack tracks come from one no-grad pass of the model the attack was
    called with, so success is judged on the real defense (only when ``need_loss``)."""

    def __init__(self, model: nn.Module, n: int = 1) -> None:
        self.model = model
        self.eot = EOT(n)
        self.passes = self.eot.n

    def __repr__(self) -> str:
        return f"Surrogate(n={self.eot.n}, model={self.model.__class__.__name__})"

    def config(self) -> dict:
        return {"estimator": "Surrogate", "n": self.eot.n, "model": repr(self.model)}

    def __call__(self, model, loss, x, y, generator=None, need_loss=True) -> GradientEstimate:
        est = self.eot(self.model, loss, x, y, generator, need_loss=False)
        if not need_loss:
            return GradientEstimate(est.grad, None, None)
        with torch.no_grad():
            logits = forward(model, x, generator)
            values = loss(logits, y, x, generator)
        return GradientEstimate(est.grad, values, logits)


def bpda(defense: Defense) -> Defense:
    """The same defense with a :class:`ssni.StraightThrough` purifier (BPDA): forward passes are
    unchanged, the input gradient is the classifier's gradient at the purified point."""
    return defense.straight_through()


def full(defense: Defense) -> Defense:
    """The same defense with network calls checkpointed in its purifier (``checkpoint=True``):
    exact gradients through every reverse step, activation memory flat in the number of steps."""
    return defense.checkpointed()


def relaxed(defense: Defense) -> Defense:
    """The same defense with its SSNI policy made differentiable: the unrounded level
    ``sigmoid((e - mu) / tau) (t* + b)`` (or the linear map) is differentiated through the EPS
    norm ``e(x)``, rounding is straight-through. Policies without that option are refused."""
    return defense.relaxed()
