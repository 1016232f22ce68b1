"""AutoAttack-style sanity checks of an evaluation: is the defense stochastic, does the attack
break the undefended classifier at the same budget, did gradients reach the input."""

from __future__ import annotations

import torch
from torch import Tensor

from ..attacks.gradients import EOT, forward
from .streams import keyed_generator

__all__ = [
    "undefended_check",
    "is_stochastic",
    "UNDEFENDED_TAG",
    "SanityError",
    "level_gradient_check",
    "lower_norm_check",
]

UNDEFENDED_TAG = 2**31 - 1


def undefended_check(defense, attack, x, y, seed, batch_size) -> dict:
    classifier = getattr(defense, "classifier", None)
    if classifier is None:
        return None
    plain = attack.with_gradient(EOT(1))
    clean_ok = robust = 0
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        gen = keyed_generator(x.device, seed, UNDEFENDED_TAG, start)
        with torch.no_grad():
            ok = classifier(xb).argmax(1) == yb
        xa = plain(classifier, xb, yb, gen)
        with torch.no_grad():
            ok_adv = classifier(xa).argmax(1) == yb
        clean_ok += int(ok.sum())
        robust += int((ok & ok_adv).sum())
    n = x.shape[0]
    return {"samples": n, "clean_accuracy": clean_ok / n, "robust_accuracy": robust / n}


def is_stochastic(defense, x: Tensor) -> bool:
    with torch.no_grad():
        a = forward(defense, x, keyed_generator(x.device, 0, 1))
        b = forward(defense, x, keyed_generator(x.device, 0, 2))
    return not torch.equal(a, b)


class SanityError(AssertionError):
    """A policy-aware attack failed a check that it must pass to count as an adaptive attack."""


def level_gradient_check(policy, x: Tensor, generator=None) -> Tensor:
    """Per-sample L2 norms ``(B,)`` of ``d t(x) / d x`` through a differentiable copy of the SSNI
    ``policy`` (soft level, straight-through rounding); raises :class:`SanityError` if every one
    is zero or any is non-finite: an attack that claims to follow ``t(x)`` would get nothing."""
    import copy

    relaxed = copy.copy(policy)
    relaxed.differentiable = True
    xi = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        t = relaxed(xi, generator=generator)
        if not t.requires_grad:
            raise SanityError("t(x) has no graph back to x: the probe is detached")
        (g,) = torch.autograd.grad(t.sum(), xi, allow_unused=True)
    if g is None:
        raise SanityError("t(x) does not depend on x through a differentiable path")
    norms = g.flatten(1).norm(dim=1)
    if not bool(torch.isfinite(norms).all()):
        raise SanityError("the gradient of t(x) w.r.t. x has non-finite entries")
    if not bool((norms > 0).any()):
        raise SanityError("the gradient of t(x) w.r.t. x is zero for every sample")
    return norms


def lower_norm_check(adaptive_norms, reference_norms, name: str = "adaptive attack") -> float:
    """Raise :class:`SanityError` unless the mean EPS norm ``e(x_adv)`` of the adaptive attack is
    below the reference attack's on the same images (else it is not doing its job). Returns the
    difference of means (adaptive - reference)."""
    import numpy as np

    a = np.asarray(adaptive_norms, dtype=float)
    r = np.asarray(reference_norms, dtype=float)
    if a.shape != r.shape or a.size == 0:
        raise ValueError("need the norms of the same, non-empty set of samples")
    diff = float(a.mean() - r.mean())
    if not diff < 0:
        raise SanityError(
            f"{name} reaches mean e(x_adv) = {a.mean():.2f}, not below the reference attack's "
            f"{r.mean():.2f} on the same images: it does not lower the score norm"
        )
    return diff
