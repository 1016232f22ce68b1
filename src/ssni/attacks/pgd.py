"""Projected gradient descent (Madry et al. 2018) with a pluggable gradient estimator.

Defaults follow the SSNI paper's evaluation (after Lee & Kim 2023): 200 iterations, step 0.007,
EOT over 20 passes, no random start; Linf 8/255 or L2 0.5 balls. For L2, the paper's code (and Lee &
Kim's) steps ``0.007 * sign(grad)`` and then projects onto the L2 ball (``l2_step="sign"``, about
0.39 in L2 length per step on 3x32x32 images); the textbook step ``0.007 * grad / ||grad||_2``
(``l2_step="normalized"``, the default) moves 0.007 per step and needs 70+ aligned steps to reach
the edge of a 0.5 ball.
"""

from __future__ import annotations

from typing import Optional, Union

from ..deprecation import renamed_attribute, renamed_keywords
from .base import Attack
from .gradients import GradientEstimator
from .losses import Loss
from .threat import ThreatModel

__all__ = ["PGD"]


_L2_STEPS = ("normalized", "sign")


class PGD(Attack):
    """``x <- P(x + step_size * d(grad))`` for ``iterations`` iterations; returns the last iterate.

    ``d`` is ``sign(grad)`` for Linf; for L2 it is ``grad / ||grad||_2`` (``l2_step="normalized"``)
    or ``sign(grad)`` (``l2_step="sign"``, the SSNI reference code's L2 attack), ``P`` the
    projection onto the ball and then the box [0, 1].

    Args:
        threat: the :class:`ThreatModel`.
        iterations: one gradient estimate each (old keyword ``steps``).
        step_size: step length in the threat model's norm (absolute, in [0, 1] pixel units).
        eot: passes of the default :class:`EOT` estimator (ignored when ``gradient`` is given).
        gradient: a gradient estimator (e.g. ``Surrogate(...)``); default ``EOT(eot)``.
        loss: ``"ce"``, ``"dlr"`` or a per-sample loss callable (maximised).
        random_start: start from a uniform random point of the threat model.
        l2_step: L2 step direction, ``"normalized"`` (textbook) or ``"sign"`` (reference);
            ignored for Linf, whose step is always the sign.
    """

    @renamed_keywords(steps="iterations")
    def __init__(
        self,
        threat: ThreatModel,
        *,
        iterations: int = 200,
        step_size: float = 0.007,
        eot: int = 20,
        gradient: Optional[GradientEstimator] = None,
        loss: Union[str, Loss] = "ce",
        random_start: bool = False,
        l2_step: str = "normalized",
    ) -> None:
        super().__init__(threat, loss=loss, eot=eot, gradient=gradient)
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        self.iterations = int(iterations)
        self.step_size = float(step_size)
        if l2_step not in _L2_STEPS:
            raise ValueError(f"l2_step must be 'normalized' or 'sign', got {l2_step!r}")
        self.random_start = bool(random_start)
        self.l2_step = l2_step

    #: Old name (the ``steps=`` keyword is deprecated).
    steps = renamed_attribute("iterations")

    def _params(self) -> dict:
        params = {
            "steps": self.iterations,  # key kept: part of evaluation-log fingerprints
            "step_size": self.step_size,
            "random_start": self.random_start,
        }
        if self.threat.norm == "L2" and self.l2_step != "normalized":
            params["l2_step"] = self.l2_step  # absent by default: older run logs stay valid
        return params

    def _direction(self, grad):
        if self.threat.norm == "L2" and self.l2_step == "sign":
            return grad.sign()
        return self.threat.direction(grad)

    def perturb(self, model, x, y, generator):
        threat = self.threat
        x_adv = threat.random_start(x, generator) if self.random_start else x.clone()
        for _ in range(self.iterations):
            grad, _, _ = self._estimate(model, x_adv, y, generator, need_loss=False)
            x_adv = threat.project(x_adv + self.step_size * self._direction(grad), x)
        return x_adv
