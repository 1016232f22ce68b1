"""Common attack machinery: ``attack(model, x, y, generator=None) -> x_adv``.

``model`` maps images ``(B, C, H, W)`` in [0, 1] to logits and is the model whose gradients the
attack follows (the defense, its BPDA/full/relaxed variant, or a surrogate); ``x_adv`` lies in the
threat model around ``x``. After each call ``attack.last_stats`` holds per-sample gradient
diagnostics: ``iterations`` (gradient estimates taken), ``zero_grad`` and ``nonfinite_grad``
(how many of them were all zero / had NaN or inf entries; non-finite entries are set to 0).

With ``track_queries`` on (:meth:`Attack.tracking`), every gradient estimate is followed by one
no-grad query of the model the attack was called with (the real defense when gradients come from
a surrogate; a :class:`Surrogate` estimate that already made that query is reused);
``last_stats["queries"]`` counts them and ``last_stats["per_sample"]["fooled_any"]`` says
whether any query misclassified the sample: the "success at any iteration" protocol of DiffBreak
(Kassis et al. 2025). Attacks may add other ``(B,)`` tensors to ``per_sample``.
"""

from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..core.defense import majority_vote
from ..core.validation import check_images
from .gradients import EOT, GradientEstimator, Surrogate, forward
from .losses import Loss, make_loss
from .threat import ThreatModel

__all__ = ["Attack", "Chain"]


def _loss_name(loss) -> str:
    return getattr(loss, "name", None) or repr(loss)


class Attack:
    """Base class of gradient attacks; subclasses implement :meth:`perturb`."""

    def __init__(
        self,
        threat: ThreatModel,
        *,
        loss: Union[str, Loss] = "ce",
        eot: int = 20,
        gradient: Optional[GradientEstimator] = None,
    ) -> None:
        if not isinstance(threat, ThreatModel):
            raise ValueError(f"threat must be a ThreatModel, got {type(threat)}")
        self.threat = threat
        self.loss = make_loss(loss)
        self.gradient = gradient if gradient is not None else EOT(eot)
        self.last_stats: Optional[dict] = None

    track_queries: bool = False

    # -- public -------------------------------------------------------------------------------
    def __call__(
        self, model, x: Tensor, y: Tensor, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Adversarial examples ``(B, C, H, W)`` for images ``x`` in [0, 1], labels ``y``."""
        check_images(x)
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        self._reset_stats(x)
        x_adv = self.perturb(model, x.detach(), y, generator)
        return x_adv.detach()

    def perturb(self, model, x, y, generator):  # pragma: no cover - abstract
        raise NotImplementedError

    def with_gradient(self, gradient: GradientEstimator) -> Attack:
        """A copy of this attack using another gradient estimator."""
        other = copy.copy(self)
        other.gradient = gradient
        other.last_stats = None
        return other

    def with_loss(self, loss: Union[str, Loss]) -> Attack:
        """A copy of this attack maximising another loss (e.g. :class:`ScoreNormLoss`)."""
        other = copy.copy(self)
        other.loss = make_loss(loss)
        other.last_stats = None
        return other

    def tracking(self, on: bool = True) -> Attack:
        """A copy of this attack that queries the model after every gradient estimate and
        records success at any iteration (see the module docstring)."""
        other = copy.copy(self)
        other.track_queries = bool(on)
        other.last_stats = None
        return other

    @property
    def passes(self) -> int:
        """Stochastic passes per gradient estimate (the EOT count)."""
        return int(getattr(self.gradient, "passes", 1))

    def config(self) -> dict:
        cfg = {"attack": type(self).__name__, "threat": self.threat.config()}
        cfg["loss"] = _loss_name(self.loss)
        cfg["gradient"] = self.gradient.config() if hasattr(self.gradient, "config") else repr(
            self.gradient
        )
        cfg.update(self._params())
        if self.track_queries:
            cfg["track_queries"] = True
        return cfg

    def _params(self) -> dict:
        return {}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return (
            f"{type(self).__name__}({self.threat!r}, loss={_loss_name(self.loss)!r}, "
            f"gradient={self.gradient!r}{', ' if params else ''}{params})"
        )

    # -- helpers for subclasses -----------------------------------------------------------------
    def _reset_stats(self, x: Tensor) -> None:
        b = x.shape[0]
        self.last_stats = {
            "iterations": 0,
            "zero_grad": torch.zeros(b, dtype=torch.long),
            "nonfinite_grad": torch.zeros(b, dtype=torch.long),
        }
        if self.track_queries:
            self.last_stats["queries"] = 0
            self.last_stats["per_sample"] = {"fooled_any": torch.zeros(b, dtype=torch.bool)}

    def _estimate(self, model, x_adv, y, generator, need_loss: bool):
        est = self.gradient(model, self.loss, x_adv, y, generator, need_loss=need_loss)
        grad = est.grad
        flat = grad.flatten(1)
        bad = ~torch.isfinite(flat).all(dim=1)
        if bool(bad.any()):
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            flat = grad.flatten(1)
        zero = flat.abs().amax(dim=1) == 0
        stats = self.last_stats
        stats["iterations"] += 1
        stats["nonfinite_grad"] += bad.long().cpu()
        stats["zero_grad"] += zero.long().cpu()
        loss = est.loss
        if loss is not None:
            loss = torch.nan_to_num(loss, nan=float("-inf"))
        if self.track_queries:
            if isinstance(self.gradient, Surrogate) and est.logits is not None:
                wrong = est.logits.argmax(1) != y  # already one query of the real model
            else:
                with torch.no_grad():
                    wrong = forward(model, x_adv, generator).argmax(1) != y
            stats["queries"] += 1
            stats["per_sample"]["fooled_any"] |= wrong.cpu()
        return grad, loss, est.logits


class Chain(Attack):
    """Run attacks in turn, each on the samples the previous ones left correctly classified
    (AutoAttack's protocol, Croce & Hein 2020). Success is checked with one no-grad pass of the
    model (or the majority over ``check_passes`` passes)."""

    def __init__(self, attacks: Sequence[Attack], *, check_passes: int = 1) -> None:
        if not attacks:
            raise ValueError("Chain needs at least one attack")
        threats = {(a.threat.norm, a.threat.eps) for a in attacks}
        if len(threats) != 1:
            raise ValueError("all attacks of a Chain must share one threat model")
        self.attacks: List[Attack] = list(attacks)
        self.threat = attacks[0].threat
        self.loss = attacks[0].loss
        self.gradient = attacks[0].gradient
        self.check_passes = int(check_passes)
        self.last_stats = None

    @property
    def passes(self) -> int:
        return min(a.passes for a in self.attacks)

    def with_gradient(self, gradient: GradientEstimator) -> Chain:
        return Chain([a.with_gradient(gradient) for a in self.attacks],
                     check_passes=self.check_passes)

    def config(self) -> dict:
        return {
            "attack": "Chain",
            "check_passes": self.check_passes,
            "attacks": [a.config() for a in self.attacks],
        }

    def __repr__(self) -> str:
        return f"Chain({self.attacks!r}, check_passes={self.check_passes})"

    def perturb(self, model, x, y, generator):
        x_adv = x.clone()
        remaining = torch.arange(x.shape[0], device=x.device)
        for attack in self.attacks:
            if remaining.numel() == 0:
                break
            xa = attack(model, x[remaining], y[remaining], generator)
            sub = attack.last_stats
            self.last_stats["iterations"] = max(self.last_stats["iterations"], sub["iterations"])
            idx_cpu = remaining.cpu()
            self.last_stats["zero_grad"][idx_cpu] += sub["zero_grad"]
            self.last_stats["nonfinite_grad"][idx_cpu] += sub["nonfinite_grad"]
            x_adv = x_adv.index_copy(0, remaining, xa)
            with torch.no_grad():
                labels, classes = [], 0
                for _ in range(self.check_passes):
                    logits = forward(model, xa, generator)
                    labels.append(logits.argmax(1))
                    classes = logits.shape[1]
                still = majority_vote(torch.stack(labels), classes) == y[remaining]
            remaining = remaining[still]
        return x_adv
