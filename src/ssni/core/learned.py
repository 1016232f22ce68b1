"""A learned noise-level policy on SSNI's own probe (an extension beyond the SSNI paper).

SSNI (Sun et al., ICML 2025) maps one number, the EPS norm ``e(x)``, to a level through a
hand-set sigmoid or line. :class:`LearnedPolicy` reads the same probe (no extra network calls:
the ``K`` perturbed copies SSNI already sends through the score model) and maps a few features of
it to the level with a small network trained on validation data (``ssni train-policy``):

* ``log e(x)``, the EPS norm;
* ``log ||s_k||`` for each of the ``K`` levels (the per-level score norms);
* ``log e(x) - log mean_k ||s_k||`` (how coherent the ``K`` scores are: 0 when they point the same
  way) and ``std_k log ||s_k||`` (their spread).

Features are standardised with the mean/std of clean validation images (buffers). The level is

    ``t = t_min + (t* + b - t_min) sigmoid(softplus(a) z_e + g(z_rest) + c)``

with ``z_e`` the standardised ``log e(x)`` and ``g`` a one-hidden-layer MLP on the other
features: ``t`` lies in ``[t_min, t* + b]`` (a subset of ``[0, t* + b]``) and is non-decreasing in
``e(x)`` when the other features are held fixed. Levels are rounded to the schedule's ``1 / N``
grid (straight-through when ``differentiable=True``, so that adaptive attacks differentiate
through ``t(x)``).

The floor ``t_min`` (default 0) is the level no input goes below. At ``t = 0`` the defense is the
bare classifier, so an attacker who can make an input look clean to the policy attacks an
undefended model; ``ssni train-policy`` chooses the floor on validation data (see
:mod:`ssni.eval.learn`).

Like :class:`~ssni.core.policies.SSNI`, the policy also holds the mean/std/min/max of the EPS norm
of the clean validation images it was trained on (:meth:`LearnedPolicy.statistics`), the target
of the constrained low-norm attack (:class:`ssni.attacks.TwoPhase`).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .policies import CleanNormStatistics, NoiseLevelPolicy, eps_probe
from .score import ScoreModel
from .validation import check_images

__all__ = ["LearnedPolicy", "probe_features", "feature_names"]


def feature_names(levels: int) -> list:
    """Names of the ``levels + 3`` features, in column order."""
    return (
        ["log_e"]
        + [f"log_norm_{k}" for k in range(1, levels + 1)]
        + ["coherence", "spread"]
    )


def probe_features(e: Tensor, level_norms: Tensor) -> Tensor:
    """Raw features ``(B, K + 3)`` from the EPS norm ``e`` ``(B,)`` and the per-level score
    norms ``(B, K)`` (column order of :func:`feature_names`); differentiable."""
    tiny = torch.finfo(e.dtype).tiny
    log_e = e.clamp_min(tiny).log()
    log_n = level_norms.clamp_min(tiny).log()
    coherence = log_e - level_norms.mean(1).clamp_min(tiny).log()
    spread = log_n.std(1, unbiased=False) if log_n.shape[1] > 1 else torch.zeros_like(log_e)
    return torch.cat([log_e[:, None], log_n, coherence[:, None], spread[:, None]], dim=1)


class LearnedPolicy(CleanNormStatistics, NoiseLevelPolicy):
    """Noise level from a small network on SSNI's probe features (see the module docstring).

    Args:
        model: score model of the EPS probe.
        t_star: base level ``t*`` (0.1 = 100 of 1000 steps).
        bias: ``b``; levels lie in ``[t_min, min(1, t* + b)]``.
        t_min: floor of the levels (0: none), at most ``t* + b``; rounded up to the grid.
        levels: K, perturbation levels of the probe.
        hidden: width of the MLP on the non-``e`` features (0: a linear map).
        differentiable: keep the graph through the probe and the network and round
            straight-through, so that ``t`` has a gradient w.r.t. ``x`` (adaptive attacks).
        chunk_size: largest batch per network call of the probe (None: chosen from the batch
            size, see :func:`ssni.core.policies.eps_probe`; 0: one call).
    """

    def __init__(
        self,
        model: ScoreModel,
        *,
        t_star: float = 0.1,
        bias: float = 0.0,
        levels: int = 20,
        hidden: int = 16,
        differentiable: bool = False,
        chunk_size: Optional[int] = None,
        t_min: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 < t_star <= 1.0:
            raise ValueError(f"t_star must be in (0, 1], got {t_star}")
        if not 0.0 < t_star + bias <= 1.0:
            raise ValueError(f"t_star + bias must be in (0, 1], got {t_star + bias}")
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0, got {hidden}")
        if not 0.0 <= t_min <= min(1.0, t_star + bias) + 1e-12:
            raise ValueError(f"t_min must be in [0, t_star + bias], got {t_min}")
        self.model = model
        self.t_star = float(t_star)
        self.bias = float(bias)
        self.levels = int(levels)
        self.hidden = int(hidden)
        self.differentiable = bool(differentiable)
        self.chunk_size = chunk_size
        self.t_min = float(t_min)
        n_feat = self.levels + 3
        self.register_buffer("feature_mean", torch.full((n_feat,), float("nan")))
        self.register_buffer("feature_std", torch.full((n_feat,), float("nan")))
        # clean EPS-norm statistics (as SSNI's): the constrained attack's target, not the level
        self._register_norm_statistics()
        # softplus(e_weight) > 0: t is non-decreasing in e(x) with the other features fixed
        self.e_weight = nn.Parameter(torch.tensor(math.log(math.expm1(1.0))))
        self.offset = nn.Parameter(torch.zeros(()))
        if self.hidden:
            self.rest = nn.Sequential(
                nn.Linear(n_feat - 1, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 1)
            )
        else:
            self.rest = nn.Linear(n_feat - 1, 1)
        nn.init.zeros_(self.rest[-1].weight if self.hidden else self.rest.weight)
        nn.init.zeros_(self.rest[-1].bias if self.hidden else self.rest.bias)

    def extra_repr(self) -> str:
        return (
            f"t_star={self.t_star}, bias={self.bias}, t_min={self.t_min}, levels={self.levels}, "
            f"hidden={self.hidden}, differentiable={self.differentiable}, fitted={self.fitted}"
        )

    @property
    def fitted(self) -> bool:
        """Whether the clean feature statistics are set."""
        stats = torch.cat([self.feature_mean, self.feature_std])
        return bool(torch.isfinite(stats).all())

    @property
    def max_level(self) -> float:
        """Largest level the policy can return, ``min(1, t* + b)`` on the ``1 / N`` grid."""
        n = self.model.schedule.num_steps
        return math.floor(min(1.0, self.t_star + self.bias) * n + 1e-9) / n

    @property
    def min_level(self) -> float:
        """Smallest level the policy can return: ``t_min`` rounded up to the ``1 / N`` grid
        (at most :attr:`max_level`)."""
        n = self.model.schedule.num_steps
        return min(math.ceil(self.t_min * n - 1e-9) / n, self.max_level)

    def statistics(self) -> dict:
        """The clean EPS-norm statistics (``mean``, ``std``, ``min``, ``max``, ``count``) of the
        validation images the policy was trained on, as plain floats (as
        :meth:`ssni.SSNI.statistics`)."""
        if not self.has_statistics:
            raise RuntimeError(
                "this LearnedPolicy has no clean EPS-norm statistics (a policy file written "
                "before they were recorded): retrain it with `ssni train-policy`"
            )
        return super().statistics()

    def set_feature_statistics(self, features: Tensor) -> None:
        """Standardise with the mean/std of raw features ``(N, K + 3)`` of clean images."""
        f = features.detach().to(self.feature_mean)
        if f.ndim != 2 or f.shape[1] != self.feature_mean.numel() or f.shape[0] < 2:
            raise ValueError(
                f"features must be (N >= 2, {self.feature_mean.numel()}), got {tuple(f.shape)}"
            )
        self.feature_mean.copy_(f.mean(0))
        self.feature_std.copy_(f.std(0).clamp_min(1e-6))

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError(
                "LearnedPolicy has no feature statistics: train it with `ssni train-policy` "
                "(or ssni.eval.learn.train_policy) or load a trained policy file"
            )

    def probe(
        self, x: Tensor, generator: Optional[torch.Generator] = None
    ) -> Tuple[Tensor, Tensor]:
        """``(e, features)``: EPS norms ``(B,)`` and raw features ``(B, K + 3)`` of ``x``."""
        check_images(x)
        e, norms = eps_probe(
            self.model, x, probe_levels=self.levels, generator=generator, chunk_size=self.chunk_size
        )
        return e, probe_features(e, norms)

    def score_norm(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """``(B,)`` EPS norms of images ``x`` in [0, 1]."""
        return self.probe(x, generator=generator)[0]

    def logit(self, features: Tensor) -> Tensor:
        """``(B,)`` pre-sigmoid value for raw features ``(B, K + 3)``."""
        self._require_fitted()
        f = features.to(self.feature_mean.dtype)
        z = (f - self.feature_mean) / self.feature_std
        return F.softplus(self.e_weight) * z[:, 0] + self.rest(z[:, 1:]).squeeze(1) + self.offset

    def level_from_features(self, features: Tensor) -> Tensor:
        """Unrounded level ``(B,)`` in ``[t_min, t* + b]`` (differentiable in the features)."""
        lo, hi = self.min_level, self.max_level
        return (lo + torch.sigmoid(self.logit(features)) * (hi - lo)).to(features.dtype)

    def quantize(self, t: Tensor) -> Tensor:
        """Round to the schedule's ``1 / N`` grid inside ``[min_level, max_level]``;
        straight-through when differentiable."""
        t_round = self.model.schedule.quantize(t.detach()).clamp(self.min_level, self.max_level)
        if self.differentiable:
            return t + (t_round - t).detach()
        return t_round

    def levels_and_norms(
        self, x: Tensor, generator: Optional[torch.Generator] = None
    ) -> Tuple[Tensor, Tensor]:
        """``(t, e)``: levels ``(B,)`` and EPS norms ``(B,)`` from one probe."""
        self._require_fitted()
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            e, feats = self.probe(x, generator=generator)
            return self.quantize(self.level_from_features(feats)), e

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Levels ``(B,)`` in ``[t_min, min(1, t* + b)]`` on the ``1 / N`` grid."""
        return self.levels_and_norms(x, generator=generator)[0]
