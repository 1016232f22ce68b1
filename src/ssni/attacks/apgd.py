"""Auto-PGD (Croce & Hein, ICML 2020) with cross-entropy or DLR loss and a gradient estimator.

Step size starts at ``2 eps`` and is halved at checkpoints ``w_j = ceil(p_j N)``, ``p_0 = 0``,
``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, for every sample where
(1) the loss increased in fewer than ``rho`` of the iterations since the last checkpoint, or
(2) the step size was not halved at the last checkpoint and the best loss has not improved since;
such a sample restarts from its best point. Updates use momentum ``alpha``:
``z = P(x_k + eta d(grad))``, ``x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))``.
The returned point is the latest iterate judged misclassified, else the best-loss iterate. Both
are judged on the losses and logits the gradient estimator reports: with :class:`EOT` the mean over
its passes through the model the attack is called with; with :class:`Surrogate` one no-grad pass of
the model the attack is called with (the real defense in ``evaluate`` and the CLI), not of the
surrogate whose gradients it follows. Called directly on a surrogate model (``evaluate(...,
surrogate=...)``), APGD chooses its iterates on that surrogate; use ``gradient=Surrogate(...)``
to choose them on the real defense. :func:`autoattack_rand` chains APGD-CE and APGD-DLR as
AutoAttack's "rand" version for stochastic defenses (EOT 20, one restart).
"""

from __future__ import annotations

import math
from typing import List, Optional, Union

import torch

from ..deprecation import renamed_attribute, renamed_keywords
from .base import Attack, Chain
from .gradients import GradientEstimator
from .losses import Loss
from .threat import ThreatModel

__all__ = ["APGD", "apgd_checkpoints", "autoattack_rand"]


def apgd_checkpoints(steps: int) -> List[int]:
    """Iterations ``w_1 < w_2 < ...`` (<= ``steps``) at which APGD may halve its step size."""
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > 1.0:
            break
        p.append(nxt)
    out: List[int] = []
    for pj in p[1:]:
        w = int(math.ceil(round(pj * steps, 9)))
        if 0 < w <= steps and (not out or w > out[-1]):
            out.append(w)
    return out


def _bcast(v, x):
    return v.reshape(-1, *([1] * (x.dim() - 1)))


class APGD(Attack):
    """Auto-PGD; see the module docstring.

    Args:
        threat: the :class:`ThreatModel` (Linf or L2).
        loss: ``"ce"``, ``"dlr"`` or a per-sample loss callable (maximised).
        iterations: AutoAttack uses 100; ``iterations + 1`` gradient estimates are taken (old
            keyword ``steps``).
        eot: passes of the default :class:`EOT` estimator (ignored when ``gradient`` is given).
        gradient: a gradient estimator; default ``EOT(eot)``.
        rho: checkpoint condition (1) threshold.
        alpha: momentum weight.
        random_start: start from a random point of the threat model (as AutoAttack does).
    """

    @renamed_keywords(steps="iterations")
    def __init__(
        self,
        threat: ThreatModel,
        *,
        loss: Union[str, Loss] = "ce",
        iterations: int = 100,
        eot: int = 20,
        gradient: Optional[GradientEstimator] = None,
        rho: float = 0.75,
        alpha: float = 0.75,
        random_start: bool = True,
    ) -> None:
        super().__init__(threat, loss=loss, eot=eot, gradient=gradient)
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.iterations = int(iterations)
        self.rho = float(rho)
        self.alpha = float(alpha)
        self.random_start = bool(random_start)

    #: Old name (the ``steps=`` keyword is deprecated).
    steps = renamed_attribute("iterations")

    def _params(self) -> dict:
        return {
            "steps": self.iterations,  # key kept: part of evaluation-log fingerprints
            "rho": self.rho,
            "alpha": self.alpha,
            "random_start": self.random_start,
        }

    def perturb(self, model, x, y, generator):
        threat = self.threat
        b = x.shape[0]
        checkpoints = set(apgd_checkpoints(self.iterations))
        x_adv = threat.random_start(x, generator) if self.random_start else x.clone()
        grad, loss, logits = self._estimate(model, x_adv, y, generator, need_loss=True)
        eta = torch.full((b,), 2.0 * threat.eps, device=x.device, dtype=x.dtype)
        x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()
        fooled = logits.argmax(1) != y
        x_fooled = x_adv.clone()
        x_prev = x_adv.clone()
        loss_prev = loss.clone()
        increases = torch.zeros(b, device=x.device)
        last_w = 0
        best_at_last_w = loss_best.clone()
        halved_at_last_w = torch.ones(b, dtype=torch.bool, device=x.device)
        for k in range(self.iterations):
            e = _bcast(eta, x)
            z = threat.project(x_adv + e * threat.direction(grad), x)
            if k == 0:
                x_new = z
            else:
                x_new = threat.project(
                    x_adv + self.alpha * (z - x_adv) + (1.0 - self.alpha) * (x_adv - x_prev), x
                )
            x_prev, x_adv = x_adv, x_new
            grad, loss, logits = self._estimate(model, x_adv, y, generator, need_loss=True)

            wrong = logits.argmax(1) != y
            x_fooled = torch.where(_bcast(wrong, x), x_adv, x_fooled)
            fooled = fooled | wrong
            increases += (loss > loss_prev).to(increases.dtype)
            loss_prev = loss
            better = loss > loss_best
            mb = _bcast(better, x)
            x_best = torch.where(mb, x_adv, x_best)
            grad_best = torch.where(mb, grad, grad_best)
            loss_best = torch.where(better, loss, loss_best)

            it = k + 1
            if it in checkpoints:
                cond1 = increases < self.rho * (it - last_w)
                cond2 = (~halved_at_last_w) & (loss_best <= best_at_last_w)
                halve = cond1 | cond2
                eta = torch.where(halve, eta * 0.5, eta)
                mh = _bcast(halve, x)
                x_adv = torch.where(mh, x_best, x_adv)
                x_prev = torch.where(mh, x_best, x_prev)
                grad = torch.where(mh, grad_best, grad)
                halved_at_last_w = halve
                best_at_last_w = loss_best.clone()
                increases.zero_()
                last_w = it
        return torch.where(_bcast(fooled, x), x_fooled, x_best)


@renamed_keywords(steps="iterations")
def autoattack_rand(
    threat: ThreatModel,
    *,
    iterations: int = 100,
    eot: int = 20,
    gradient: Optional[GradientEstimator] = None,
) -> Chain:
    """AutoAttack's "rand" version for randomised defenses: APGD-CE, then APGD-DLR on the
    samples still correctly classified, each with EOT (default 20 passes) and one restart."""
    return Chain(
        [
            APGD(threat, loss="ce", iterations=iterations, eot=eot, gradient=gradient),
            APGD(threat, loss="dlr", iterations=iterations, eot=eot, gradient=gradient),
        ]
    )
