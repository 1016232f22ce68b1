"""Reverse diffusion with a per-sample start time.

Every sample ``i`` descends from its own ``t_i`` to 0 through the times
``t_i (1 - j / n_i)``, ``j = 0..n_i``. The step count ``n_i`` is either fixed (``steps``) or
``ceil(t_i / step_size)`` (``step_size``: a sample at small ``t`` takes fewer steps). All samples
finish together: at global iteration ``k = K..1`` (``K = max_i n_i``) only the samples with
``n_i >= k`` are advanced, by indexing the active subset, calling the network on it and scattering
back. This is exact, spends network calls only on steps actually taken, and has no NaN gradients
(no masking through ``sqrt(0)``).

Step rules are plain functions ``rule(eps, x, t, s, schedule, generator) -> x_s`` of the
network's noise prediction ``eps`` at ``(x, t)``, moving from time ``t`` to ``s < t`` (all times
``(B,)`` tensors):

* :func:`ddim_step`: the generalised DDIM update (Song et al. 2021, eq. 12); ``eta = 1`` is
  ancestral DDPM sampling (Ho et al. 2020), ``eta = 0`` deterministic DDIM.
* :func:`euler_maruyama_step`: one Euler-Maruyama step of the reverse VP-SDE (Song et al. 2021),
  DiffPure's continuous mode.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from .diffusion import VPSchedule, expand_like, safe_sqrt
from .score import ScoreModel

__all__ = [
    "ddim_step",
    "euler_maruyama_step",
    "make_step_rule",
    "step_counts",
    "reverse",
    "ReverseResult",
    "StepRule",
]

StepRule = Callable[..., Tensor]


def _noise_like(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def ddim_step(
    eps: Tensor,
    x: Tensor,
    t: Tensor,
    s: Tensor,
    schedule: VPSchedule,
    generator: Optional[torch.Generator] = None,
    *,
    eta: float = 1.0,
) -> Tensor:
    """Generalised DDIM step from ``t`` to ``s`` (``eta`` = 1: DDPM, 0: DDIM).

    ``x0_hat = (x - sqrt(1 - a_t) eps) / sqrt(a_t)``,
    ``x_s = sqrt(a_s) x0_hat + sqrt(1 - a_s - c^2) eps + c z`` with
    ``c = eta sqrt((1 - a_s) / (1 - a_t)) sqrt(1 - a_t / a_s)``.
    """
    a_t = expand_like(schedule.alpha_bar(t), x)
    a_s = expand_like(schedule.alpha_bar(s), x)
    x0_hat = (x - safe_sqrt(1.0 - a_t) * eps) / a_t.sqrt()
    c = eta * safe_sqrt((1.0 - a_s) / (1.0 - a_t).clamp_min(1e-20)) * safe_sqrt(1.0 - a_t / a_s)
    out = a_s.sqrt() * x0_hat + safe_sqrt(1.0 - a_s - c * c) * eps
    if eta > 0:
        out = out + c * _noise_like(x, generator)
    return out


def euler_maruyama_step(
    eps: Tensor,
    x: Tensor,
    t: Tensor,
    s: Tensor,
    schedule: VPSchedule,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Euler-Maruyama step of the reverse VP-SDE from ``t`` to ``s``.

    ``x_s = x + (beta x / 2 + beta score) dt + sqrt(beta dt) z``, ``dt = t - s``,
    ``score = -eps / sigma(t)``.
    """
    beta = expand_like(schedule.beta(t), x)
    dt = expand_like(t - s, x)
    score = -eps / expand_like(schedule.sigma(t), x)
    return (
        x + (0.5 * beta * x + beta * score) * dt + safe_sqrt(beta * dt) * _noise_like(x, generator)
    )


def make_step_rule(rule: str, eta: Optional[float] = None) -> StepRule:
    """Step rule by name: ``"ddpm"`` (eta 1), ``"ddim"`` (eta 0 or ``eta``), ``"sde"``."""
    if rule == "ddpm":
        return functools.partial(ddim_step, eta=1.0 if eta is None else float(eta))
    if rule == "ddim":
        return functools.partial(ddim_step, eta=0.0 if eta is None else float(eta))
    if rule == "sde":
        if eta is not None:
            raise ValueError("eta applies to the 'ddpm'/'ddim' rules, not 'sde'")
        return euler_maruyama_step
    raise ValueError(f"unknown step rule {rule!r}; expected 'ddpm', 'ddim' or 'sde'")


def step_counts(
    t_start: Tensor, *, steps: Optional[int] = None, step_size: Optional[float] = None
) -> Tensor:
    """Number of reverse steps per sample, ``(B,)`` int64.

    Exactly one of ``steps`` (the same count for every sample with ``t > 0``) and ``step_size``
    (``ceil(t / step_size)``, up to float rounding on the ``1/1000`` grid) must be given.
    A sample with ``t = 0`` takes no step.
    """
    if (steps is None) == (step_size is None):
        raise ValueError("give exactly one of steps= and step_size=")
    positive = t_start.detach() > 0
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        n = torch.full_like(t_start, steps, dtype=torch.long)
    else:
        if not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        ratio = t_start.detach().double() / step_size
        n = torch.ceil(ratio - 1e-3).long().clamp_min(1)
    return torch.where(positive, n, torch.zeros_like(n))


class ReverseResult(NamedTuple):
    """``x``: samples at time 0 ``(B, C, H, W)``; ``nfe``: network calls per sample ``(B,)``."""

    x: Tensor
    nfe: Tensor


def reverse(
    model: ScoreModel,
    x_t: Tensor,
    t_start: Tensor,
    *,
    rule: StepRule = ddim_step,
    steps: Optional[int] = None,
    step_size: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    checkpoint: bool = False,
) -> ReverseResult:
    """Run the reverse process for every sample from its own ``t_start`` down to 0.

    Args:
        model: score model (``eps(x, t)``) in model space.
        x_t: ``(B, C, H, W)`` noisy samples at their times ``t_start``.
        t_start: ``(B,)`` start times in [0, 1]; may carry gradients (times are differentiable
            functions of it; step counts are not).
        rule: step rule (see module docs); default DDPM (``eta = 1``).
        steps, step_size: step spacing (see :func:`step_counts`); default ``step_size = 1e-3``.
        generator: source of the step noise.
        checkpoint: recompute the network call in the backward pass instead of storing its
            activations (memory flat in the number of steps when differentiating).

    Returns:
        :class:`ReverseResult` with the samples at time 0 and the per-sample network calls.
    """
    if steps is None and step_size is None:
        step_size = 1e-3
    n = step_counts(t_start, steps=steps, step_size=step_size)
    nfe = torch.zeros_like(n)
    total = int(n.max().item()) if n.numel() else 0
    schedule = model.schedule
    n_f = n.to(t_start.dtype).clamp_min(1)
    x = x_t
    for k in range(total, 0, -1):
        active = (n >= k).nonzero(as_tuple=True)[0]
        all_active = active.numel() == x.shape[0]
        xa = x if all_active else x.index_select(0, active)
        ta0 = t_start if all_active else t_start.index_select(0, active)
        na = n_f if all_active else n_f.index_select(0, active)
        j = na - k  # local step index of each active sample
        t_now = ta0 * (1.0 - j / na)
        t_next = ta0 * (1.0 - (j + 1.0) / na)
        if checkpoint and torch.is_grad_enabled():
            eps = _checkpoint(model.eps, xa, t_now, use_reentrant=False)
        else:
            eps = model.eps(xa, t_now)
        xa = rule(eps, xa, t_now, t_next, schedule, generator)
        x = xa if all_active else x.index_copy(0, active, xa)
        nfe = nfe + (n >= k).long()
    return ReverseResult(x, nfe)
