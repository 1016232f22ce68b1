"""Constrained attack on SSNI: fool the classifier while keeping the EPS norm ``e(x)`` low.

Two phases (after the constrained-attack idea of the SSNI adaptive-attack discussion):

1. **Lower the norm.** ``norm_steps`` steps of L2-normalised gradient descent on ``e(x)`` (exact
   gradient through the policy's probe) inside the threat model, so that the input reaches the
   region below the target (default: the clean 90th percentile) where the policy assigns the low
   level of a clean input. Sign steps would add high-frequency noise that raises ``e(x)``.
2. **Attack inside the low-norm region.** ``steps`` PGD steps on the classification loss with
   the hinge of :class:`~ssni.attacks.norm.NormPenaltyLoss` on ``e(x)`` above the target and a
   per-sample adaptive multiplier: multiplied by ``lam_growth`` after an iterate above the
   target, divided by it after one below (within ``[lam_min, lam_max]``).

The returned point is the latest iterate that the real defense misclassified with ``e(x)`` at or
below the target, else the latest misclassified one, else the latest below the target, else the
last iterate. ``last_stats["per_sample"]`` adds ``min_norm`` (lowest ``e(x)`` measured),
``phase1_norm`` (``e(x)`` after phase 1) and ``fooled_norm`` (lowest ``e(x)`` of an iterate the
defense misclassified, ``inf`` if none), all ``(B,)``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .apgd import _bcast
from .base import Attack
from .gradients import GradientEstimator
from .losses import Loss, make_loss
from .norm import clean_norm_target
from .threat import ThreatModel, _per_sample_l2

__all__ = ["TwoPhase", "lower_norm"]


def _unit_l2(g: Tensor) -> Tensor:
    return g / _per_sample_l2(g).clamp_min(1e-12)


def lower_norm(
    policy,
    threat: ThreatModel,
    x: Tensor,
    x_start: Tensor,
    *,
    steps: int,
    step: float,
    generator: Optional[torch.Generator] = None,
):
    """Descend ``e(x)`` from ``x_start`` inside ``threat`` around ``x``.

    Each step moves ``step * eps * sqrt(C*H*W)`` in L2 (the length of a sign step of size
    ``step * eps``) along ``-grad e / ||grad e||``, then projects. Returns the lowest-norm iterate
    ``(B, C, H, W)``, its norms ``(B,)`` and the number of probe calls made.
    """
    d = x[0].numel()
    length = step * threat.eps * math.sqrt(d)
    x_adv = x_start.detach().clone()
    best_x, best_e = x_adv.clone(), None
    for k in range(steps + 1):
        xi = x_adv.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            e = policy.score_norm(xi, generator=generator)
            (g,) = torch.autograd.grad(e.sum(), xi) if k < steps else (None,)
        e = e.detach()
        if best_e is None:
            best_e = e.clone()
        else:
            better = e < best_e
            best_x = torch.where(_bcast(better, x), x_adv, best_x)
            best_e = torch.where(better, e, best_e)
        if k == steps:
            break
        g = torch.nan_to_num(g)
        x_adv = threat.project(x_adv - length * _unit_l2(g), x)
    return best_x, best_e, steps + 1


class TwoPhase(Attack):
    """Norm-constrained attack on an SSNI defense (see the module docstring).

    Phase 2 steps along ``u(g_loss) - lam * [e(x) > target] * u(g_e)``, ``u`` the L2-normalised
    vector, ``g_loss`` the estimator's gradient of the classification loss and ``g_e`` the exact
    gradient of ``e(x)`` from one probe per iteration (the hinge of
    :class:`~ssni.attacks.norm.NormPenaltyLoss`, at one probe per iteration instead of one per
    EOT pass). ``lam`` adapts per sample.

    Args:
        threat: the :class:`ThreatModel`.
        policy: the defense's fitted :class:`ssni.SSNI` or :class:`ssni.LearnedPolicy` (probe
            ``score_norm`` and clean ``statistics()``).
        target: norm threshold (None: the clean ``quantile`` of :func:`clean_norm_target`).
        quantile: clean quantile of the default target (0.9).
        norm_steps: phase-1 iterations (probe gradients only, no purification).
        norm_step: phase-1 step, as a fraction of ``eps`` per pixel-equivalent (see
            :func:`lower_norm`).
        steps: phase-2 iterations (one gradient estimate and one probe each, plus a last
            estimate to judge the final iterate).
        step_size: phase-2 step length in the threat model's norm.
        direction: phase-2 step, ``"sign"`` (the threat model's steepest ascent) or ``"l2"``
            (L2-normalised direction with the L2 length of a sign step, then projected).
        loss: classification loss (``"ce"``, ``"dlr"`` or a callable).
        lam, lam_growth, lam_min, lam_max: initial penalty multiplier and its adaptation.
        eot, gradient: the gradient estimator of phase 2 (default ``EOT(eot)``).
    """

    def __init__(
        self,
        threat: ThreatModel,
        policy,
        *,
        target: Optional[float] = None,
        quantile: float = 0.9,
        norm_steps: int = 2,
        norm_step: float = 0.1,
        steps: int = 5,
        step_size: float = 0.01,
        direction: str = "sign",
        loss: Union[str, Loss] = "ce",
        lam: float = 1.0,
        lam_growth: float = 2.0,
        lam_min: float = 0.1,
        lam_max: float = 100.0,
        eot: int = 20,
        gradient: Optional[GradientEstimator] = None,
    ) -> None:
        if norm_steps < 0 or steps < 0:
            raise ValueError("norm_steps and steps must be >= 0")
        if direction not in ("sign", "l2"):
            raise ValueError(f"direction must be 'sign' or 'l2', got {direction!r}")
        if not (0 < lam_min <= lam <= lam_max and lam_growth >= 1):
            raise ValueError("need 0 < lam_min <= lam <= lam_max and lam_growth >= 1")
        super().__init__(threat, loss=make_loss(loss), eot=eot, gradient=gradient)
        self.policy = policy
        self.target = float(clean_norm_target(policy, quantile) if target is None else target)
        self.norm_steps = int(norm_steps)
        self.norm_step = float(norm_step)
        self.steps = int(steps)
        self.step_size = float(step_size)
        self.direction = direction
        self.lam0 = float(lam)
        self.lam_growth = float(lam_growth)
        self.lam_min = float(lam_min)
        self.lam_max = float(lam_max)

    def _params(self) -> dict:
        return {
            "target": self.target,
            "norm_steps": self.norm_steps,
            "norm_step": self.norm_step,
            "steps": self.steps,
            "step_size": self.step_size,
            "direction": self.direction,
            "lam": self.lam0,
            "lam_growth": self.lam_growth,
            "lam_min": self.lam_min,
            "lam_max": self.lam_max,
        }

    def _step(self, direction: Tensor) -> Tensor:
        if self.direction == "sign":
            return self.step_size * self.threat.direction(direction)
        d = direction[0].numel()
        length = self.step_size * (math.sqrt(d) if self.threat.norm == "Linf" else 1.0)
        return length * _unit_l2(direction)

    def _norm_and_grad(self, x_adv: Tensor, generator):
        xi = x_adv.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            e = self.policy.score_norm(xi, generator=generator)
            (g,) = torch.autograd.grad(e.sum(), xi)
        return e.detach(), torch.nan_to_num(g)

    def perturb(self, model, x, y, generator):
        threat, b = self.threat, x.shape[0]
        x_adv, e, probes = lower_norm(
            self.policy, threat, x, x.clone(), steps=self.norm_steps, step=self.norm_step,
            generator=generator,
        )
        stats = self.last_stats
        phase1 = e.clone()
        min_norm = e.clone()
        fooled_norm = torch.full_like(e, float("inf"))
        lam = torch.full((b,), self.lam0, device=x.device, dtype=x.dtype)
        best = {k: x_adv.clone() for k in ("fooled_ok", "fooled", "ok")}
        have = {k: torch.zeros(b, dtype=torch.bool, device=x.device) for k in best}
        for k in range(self.steps + 1):
            grad, _, logits = self._estimate(model, x_adv, y, generator, need_loss=True)
            e, g_e = self._norm_and_grad(x_adv, generator)
            probes += 1
            min_norm = torch.minimum(min_norm, e)
            ok = e <= self.target
            fooled = logits.argmax(1) != y
            fooled_norm = torch.where(fooled, torch.minimum(fooled_norm, e), fooled_norm)
            for key, flag in (("fooled_ok", fooled & ok), ("fooled", fooled), ("ok", ok)):
                best[key] = torch.where(_bcast(flag, x), x_adv, best[key])
                have[key] = have[key] | flag
            if k == self.steps:
                break
            lam = torch.where(ok, lam / self.lam_growth, lam * self.lam_growth)
            lam = lam.clamp(self.lam_min, self.lam_max)
            push = torch.where(ok, torch.zeros_like(lam), lam)
            direction = _unit_l2(grad) - _bcast(push, x) * _unit_l2(g_e)
            x_adv = threat.project(x_adv + self._step(direction), x)
        out = x_adv
        for key in ("ok", "fooled", "fooled_ok"):  # later keys take precedence
            out = torch.where(_bcast(have[key], x), best[key], out)
        stats["probe_gradients"] = probes
        stats.setdefault("per_sample", {})
        stats["per_sample"]["min_norm"] = min_norm.detach().cpu()
        stats["per_sample"]["phase1_norm"] = phase1.detach().cpu()
        stats["per_sample"]["fooled_norm"] = fooled_norm.detach().cpu()
        return out
