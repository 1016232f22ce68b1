"""AutoAttack-style sanity checks of an evaluation: is the defense stochastic, does the attack
break the undefended classifier at the same budget, did gradients reach the input."""

from __future__ import annotations

import torch
from torch import Tensor

from ..attacks.gradients import EOT, forward
from .streams import keyed_generator

__all__ = ["undefended_check", "is_stochastic", "UNDEFENDED_TAG"]

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
