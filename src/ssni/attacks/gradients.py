"""Gradient estimators handed to attacks (never copied into them).

An estimator is called as ``estimator(model, loss, x, y, generator=None, need_loss=True)`` and
returns a :class:`GradientEstimate`: the input gradient ``(B, C, H, W)`` of the per-sample loss
``loss(model(x), y, x)`` and, if ``need_loss``, the per-sample loss ``(B,)`` and logits
``(B, classes)`` the attack uses for bookkeeping. ``model`` is any module mapping images in
[0, 1] to logits; a ``generator`` is passed to it when its ``forward`` accepts one (a
:class:`ssni.Defense` does), so that stochastic passes are reproducible.

* :class:`EOT` -- expectation over transformation (Athalye et al. 2018): the mean gradient over
  ``n`` stochastic passes, run as one batch of ``n x B`` images (split to a memory limit), with
  the noise levels ``t(x)`` computed once per estimate and shared by the passes.
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

import contextlib
import inspect
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..core.defense import Defense

__all__ = [
    "EOT_MAX_BATCH",
    "GradientEstimate",
    "GradientEstimator",
    "EOT",
    "Surrogate",
    "bpda",
    "full",
    "relaxed",
    "forward",
]


#: Default images per call of a batched EOT estimate: on CPU the per-image speed of the shipped
#: networks peaks near 64 images per call, and a call's graph then holds no more than one
#: sequential pass of 64 images (a graph through 20 reverse steps of the Fashion-MNIST UNet
#: holds about 110 MB per image).
EOT_MAX_BATCH = 64


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


def _shared_levels(model, x: Tensor, generator) -> Optional[Tensor]:
    """``t(x)`` ``(B,)`` computed once without gradients, for a model with a ``policy`` and a
    ``levels`` method (a :class:`ssni.Defense`) whose policy is not differentiable; else None
    (a relaxed policy keeps its per-pass probe, so ``t`` carries gradients in every pass)."""
    policy = getattr(model, "policy", None)
    levels = getattr(model, "levels", None)
    if policy is None or levels is None or getattr(policy, "differentiable", False):
        return None
    with torch.no_grad():
        return levels(x, generator=generator)


def _forward_at(model, x: Tensor, generator, t: Optional[Tensor]) -> Tensor:
    if t is None:
        return forward(model, x, generator)
    return model(x, generator=generator, t=t)


def _autocast(x: Tensor, dtype: Optional[torch.dtype]):
    """Autocast to ``dtype`` on ``x``'s device type, or a no-op context for ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, dtype=dtype)


def _passes_grad(model, loss, x, y, generator, t, copies: int, autocast=None):
    """``copies`` passes as one batch of ``copies * B`` images (pass-major rows): the summed
    input gradient ``(B, C, H, W)``, per-sample loss sums ``(B,)`` and logit sums ``(B, K)``.
    With ``autocast`` (a dtype) the passes run under autocast; logits, loss and gradient stay
    in ``x``'s dtype."""
    b = x.shape[0]
    xi = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        xr = xi if copies == 1 else xi.repeat(copies, *([1] * (x.dim() - 1)))
        yr = y if copies == 1 else y.repeat(copies)
        tr = t if (t is None or copies == 1) else t.repeat(copies)
        with _autocast(x, autocast):
            logits = _forward_at(model, xr, generator, tr)
        logits = logits.to(x.dtype)
        values = loss(logits, yr, xr, generator)
        if values.requires_grad:
            (g,) = torch.autograd.grad(values.sum(), xi, allow_unused=True)
        else:
            g = None
    if g is None:
        g = torch.zeros_like(xi)
    values = values.detach().reshape(copies, b).sum(0)
    logits = logits.detach().reshape(copies, b, -1).sum(0)
    return g, values, logits


class EOT(GradientEstimator):
    """Expectation over transformation: mean over ``n`` passes of the input gradient (and of
    the per-sample loss and logits). ``n = 1`` is the plain gradient of one pass.

    Args:
        n: stochastic passes per estimate.
        batched: run the passes as one batch of ``n x B`` images (pass-major rows), split into
            calls of at most ``max_batch`` images; ``False`` runs them one after the other (one
            graph at a time). The estimate is the same in expectation; with the same random
            stream it is the same number (a call holding one pass draws exactly what a
            sequential pass draws).
        max_batch: largest number of images per batched call (the memory limit; at least one
            pass of ``B`` images per call; default :data:`EOT_MAX_BATCH`); None: all ``n x B``
            at once (raise it on a GPU).
        share_levels: compute the noise levels ``t(x)`` (the SSNI EPS probe) once per estimate
            and share them across the passes, as the SSNI reference does; ``False`` re-runs the
            policy in every pass. Applies to models with a ``levels`` method whose policy is not
            differentiable (a :class:`ssni.Defense`).
        autocast: a dtype (``torch.bfloat16``) under which the passes run (``torch.autocast``
            on the input's device): cheaper gradients of slightly lower precision; the shared
            levels ``t(x)`` are still computed in the input's precision. ``None``: no autocast.
    """

    def __init__(
        self,
        n: int = 20,
        *,
        batched: bool = True,
        max_batch: Optional[int] = EOT_MAX_BATCH,
        share_levels: bool = True,
        autocast: Optional[torch.dtype] = None,
    ) -> None:
        if n < 1:
            raise ValueError(f"EOT needs n >= 1, got {n}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 or None, got {max_batch}")
        self.n = int(n)
        self.passes = self.n
        self.batched = bool(batched)
        self.max_batch = None if max_batch is None else int(max_batch)
        self.share_levels = bool(share_levels)
        if autocast is not None and not isinstance(autocast, torch.dtype):
            raise ValueError(f"autocast must be a torch.dtype or None, got {autocast!r}")
        self.autocast = autocast

    def __repr__(self) -> str:
        extra = "" if self.autocast is None else f", autocast={self.autocast}"
        return (
            f"EOT(n={self.n}, batched={self.batched}, max_batch={self.max_batch}, "
            f"share_levels={self.share_levels}{extra})"
        )

    def config(self) -> dict:
        cfg = {
            "estimator": "EOT",
            "n": self.n,
            "batched": self.batched,
            "max_batch": self.max_batch,
            "share_levels": self.share_levels,
        }
        if self.autocast is not None:  # absent by default: older run logs stay valid
            cfg["autocast"] = str(self.autocast).replace("torch.", "")
        return cfg

    def passes_per_call(self, batch: int) -> int:
        """Passes run together in one call for a batch of ``batch`` images."""
        if not self.batched:
            return 1
        if self.max_batch is None:
            return self.n
        return max(1, min(self.n, self.max_batch // max(batch, 1)))

    def __call__(
        self, model, loss, x, y, generator=None, need_loss=True, levels: Optional[Tensor] = None
    ) -> GradientEstimate:
        """``levels``: precomputed ``t(x)`` ``(B,)`` to use in every pass (skips the policy)."""
        t = levels
        if t is None and self.share_levels:
            t = _shared_levels(model, x, generator)
        per_call = self.passes_per_call(x.shape[0])
        grad = loss_sum = logit_sum = None
        done = 0
        while done < self.n:
            copies = min(per_call, self.n - done)
            g, v, z = _passes_grad(model, loss, x, y, generator, t, copies, self.autocast)
            if grad is None:
                grad, loss_sum, logit_sum = g, v, z
            else:
                grad, loss_sum, logit_sum = grad + g, loss_sum + v, logit_sum + z
            done += copies
        return GradientEstimate(grad / self.n, loss_sum / self.n, logit_sum / self.n)


class Surrogate(GradientEstimator):
    """Gradients from ``model`` (a cheaper copy of the defense, EOT over ``n`` passes); the loss
    and logits that the attack tracks come from one no-grad pass of the model the attack was
    called with, so success is judged on the real defense (only when ``need_loss``).

    ``batched``, ``max_batch``, ``share_levels`` and ``autocast`` are those of :class:`EOT`
    (``autocast`` applies to the surrogate's passes only, never to the real defense); with
    ``share_levels`` the levels ``t(x)`` are computed once per estimate from the surrogate's
    policy and also used by the real defense's loss pass when both share that policy.
    """

    def __init__(
        self,
        model: nn.Module,
        n: int = 1,
        *,
        batched: bool = True,
        max_batch: Optional[int] = EOT_MAX_BATCH,
        share_levels: bool = True,
        autocast: Optional[torch.dtype] = None,
    ) -> None:
        self.model = model
        self.eot = EOT(
            n, batched=batched, max_batch=max_batch, share_levels=share_levels, autocast=autocast
        )
        self.passes = self.eot.n

    def __repr__(self) -> str:
        return f"Surrogate({self.eot!r}, model={self.model.__class__.__name__})"

    def config(self) -> dict:
        cfg = self.eot.config()
        cfg.update(estimator="Surrogate", model=repr(self.model))
        return cfg

    def __call__(self, model, loss, x, y, generator=None, need_loss=True) -> GradientEstimate:
        t = _shared_levels(self.model, x, generator) if self.eot.share_levels else None
        est = self.eot(self.model, loss, x, y, generator, need_loss=False, levels=t)
        if not need_loss:
            return GradientEstimate(est.grad, None, None)
        same_policy = t is not None and getattr(model, "policy", None) is getattr(
            self.model, "policy", None
        )
        with torch.no_grad():
            logits = _forward_at(model, x, generator, t if same_policy else None)
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
