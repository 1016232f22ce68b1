"""Per-sample optimal-noise analysis (``ssni analyze-t``): the paper's motivation figure.

For every sample, purify at each level of a grid of constant ``t`` and record whether the
classifier is right. Clean samples are often right only at small ``t`` (noise erases their
semantics) and adversarial ones only at large ``t`` (noise must wash out the perturbation), which
is what a single ``t*`` cannot serve and what SSNI's per-sample ``t(x)`` tries to follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..core.defense import majority_vote
from ..core.policies import NoiseLevelPolicy
from ..core.purifiers import Purifier

__all__ = [
    "correctness_grid",
    "right_only_below",
    "right_only_above",
    "TAnalysis",
    "analyze_t",
]

Progress = Optional[Callable[[int], None]]


def _grid(t_grid: Union[Sequence[float], Tensor]) -> Tensor:
    t = torch.as_tensor(t_grid, dtype=torch.float64).flatten()
    if t.numel() == 0 or bool((t <= 0).any()) or bool((t > 1).any()):
        raise ValueError(f"t_grid must be non-empty levels in (0, 1], got {t.tolist()}")
    if bool((t[1:] <= t[:-1]).any()):
        raise ValueError(f"t_grid must be strictly increasing, got {t.tolist()}")
    return t


@torch.no_grad()
def correctness_grid(
    purifier: Purifier,
    classifier: nn.Module,
    x: Tensor,
    y: Tensor,
    t_grid: Union[Sequence[float], Tensor],
    *,
    votes: int = 1,
    batch_size: int = 64,
    generator: Optional[torch.Generator] = None,
    progress: Progress = None,
) -> Tensor:
    """``(N, T)`` booleans: is ``classifier(purifier(x_i, t_j))`` right (majority of ``votes``)?

    Args:
        purifier, classifier: the defense's parts (images in [0, 1]).
        x, y: images ``(N, C, H, W)`` in [0, 1] and labels ``(N,)``.
        t_grid: constant levels in (0, 1], increasing.
        votes: stochastic passes per decision (ties: smallest label).
        batch_size: images per purifier call.
        generator: source of the purification noise.
        progress: called with the number of images finished after each (batch, level).
    """
    t = _grid(t_grid)
    if votes < 1:
        raise ValueError(f"votes must be >= 1, got {votes}")
    device = y.device
    out = torch.zeros(x.shape[0], t.numel(), dtype=torch.bool, device=device)
    for j, level in enumerate(t.tolist()):
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            labels, classes = [], 0
            for _ in range(votes):
                logits = classifier(purifier(xb, float(level), generator=generator))
                labels.append(logits.argmax(1))
                classes = logits.shape[1]
            pred = majority_vote(torch.stack(labels), classes)
            out[i : i + batch_size, j] = pred.to(device) == yb
            if progress is not None:
                progress(xb.shape[0])
    return out


def right_only_below(
    correct: Tensor, t_grid: Union[Sequence[float], Tensor], t_star: float
) -> float:
    """Fraction of samples right at some grid level ``t < t*`` and wrong at every ``t >= t*``."""
    t = _grid(t_grid)
    below = t < t_star - 1e-12
    c = torch.as_tensor(correct, dtype=torch.bool)
    if c.shape[0] == 0:
        return float("nan")
    hit = c[:, below].any(1) & ~c[:, ~below].any(1)
    return float(hit.double().mean())


def right_only_above(
    correct: Tensor, t_grid: Union[Sequence[float], Tensor], t_star: float
) -> float:
    """Fraction of samples right at some grid level ``t > t*`` and wrong at every ``t <= t*``."""
    t = _grid(t_grid)
    above = t > t_star + 1e-12
    c = torch.as_tensor(correct, dtype=torch.bool)
    if c.shape[0] == 0:
        return float("nan")
    hit = c[:, above].any(1) & ~c[:, ~above].any(1)
    return float(hit.double().mean())


@dataclass
class TAnalysis:
    """Result of :func:`analyze_t`; tensors live on the CPU.

    ``clean_correct``/``adv_correct`` are ``(N, T)`` booleans over ``t_grid``; ``clean_t``/
    ``adv_t`` the policy's levels ``t(x)`` (``None`` without a policy).
    """

    t_grid: Tensor
    t_star: float
    clean_correct: Tensor
    adv_correct: Optional[Tensor] = None
    clean_t: Optional[Tensor] = None
    adv_t: Optional[Tensor] = None

    def fractions(self) -> Dict[str, float]:
        """The motivation numbers (NaN where the adversarial part is missing)."""
        out = {
            "clean_right_only_below_t_star": right_only_below(
                self.clean_correct, self.t_grid, self.t_star
            ),
            "clean_right_only_above_t_star": right_only_above(
                self.clean_correct, self.t_grid, self.t_star
            ),
            "clean_never_right": float((~self.clean_correct.any(1)).double().mean()),
        }
        if self.adv_correct is not None:
            out.update(
                adv_right_only_above_t_star=right_only_above(
                    self.adv_correct, self.t_grid, self.t_star
                ),
                adv_right_only_below_t_star=right_only_below(
                    self.adv_correct, self.t_grid, self.t_star
                ),
                adv_never_right=float((~self.adv_correct.any(1)).double().mean()),
            )
        else:
            out.update(
                adv_right_only_above_t_star=float("nan"),
                adv_right_only_below_t_star=float("nan"),
                adv_never_right=float("nan"),
            )
        return out

    def accuracy_curves(self) -> Dict[str, Tensor]:
        """Accuracy at each grid level: ``{"clean": (T,), "adversarial": (T,)}``."""
        curves = {"clean": self.clean_correct.double().mean(0)}
        if self.adv_correct is not None:
            curves["adversarial"] = self.adv_correct.double().mean(0)
        return curves

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able summary with the per-sample maps."""

        def _list(v: Optional[Tensor]) -> Optional[list]:
            return None if v is None else v.tolist()

        return {
            "t_grid": self.t_grid.tolist(),
            "t_star": self.t_star,
            "fractions": self.fractions(),
            "accuracy": {k: v.tolist() for k, v in self.accuracy_curves().items()},
            "clean_correct": _list(self.clean_correct.int()),
            "adv_correct": None if self.adv_correct is None else _list(self.adv_correct.int()),
            "clean_t": _list(self.clean_t),
            "adv_t": _list(self.adv_t),
        }


@torch.no_grad()
def _levels(
    policy: NoiseLevelPolicy, x: Tensor, batch_size: int, generator: Optional[torch.Generator]
) -> Tensor:
    return torch.cat(
        [
            policy(x[i : i + batch_size], generator=generator)
            for i in range(0, x.shape[0], batch_size)
        ]
    )


def analyze_t(
    purifier: Purifier,
    classifier: nn.Module,
    x: Tensor,
    y: Tensor,
    t_grid: Union[Sequence[float], Tensor],
    t_star: float,
    *,
    x_adv: Optional[Tensor] = None,
    policy: Optional[NoiseLevelPolicy] = None,
    votes: int = 1,
    batch_size: int = 64,
    generator: Optional[torch.Generator] = None,
    progress: Progress = None,
) -> TAnalysis:
    """Correctness maps of clean (and adversarial) samples over ``t_grid``.

    Args:
        purifier, classifier: the defense's parts.
        x, y: clean images in [0, 1] and labels.
        t_grid: increasing constant levels in (0, 1].
        t_star: the reference constant level (0.1 = 100 steps) the fractions are measured against.
        x_adv: adversarial versions of ``x`` (same labels), optional.
        policy: if given (e.g. a fitted SSNI policy), its ``t(x)`` is recorded for every sample.
        votes, batch_size, generator, progress: see :func:`correctness_grid`.
    """
    t = _grid(t_grid)
    kwargs = dict(votes=votes, batch_size=batch_size, generator=generator, progress=progress)
    clean = correctness_grid(purifier, classifier, x, y, t, **kwargs).cpu()
    adv = None
    if x_adv is not None:
        if x_adv.shape != x.shape:
            raise ValueError(f"x_adv must have the shape of x {tuple(x.shape)}, got {x_adv.shape}")
        adv = correctness_grid(purifier, classifier, x_adv, y, t, **kwargs).cpu()
    clean_t = adv_t = None
    if policy is not None:
        clean_t = _levels(policy, x, batch_size, generator).detach().double().cpu()
        if x_adv is not None:
            adv_t = _levels(policy, x_adv, batch_size, generator).detach().double().cpu()
    return TAnalysis(t, float(t_star), clean, adv, clean_t, adv_t)
