"""GNS: gradual noise scheduling (Lee & Kim 2023, "Robust evaluation of diffusion-based
adversarial purification", ICCV).

A sequence of purification stages, each a DiffPure pass (noise to the stage's level, reverse to
0) applied to the previous stage's output; stages stay in model space and the result is clipped
to [0, 1] once at the end. The published defense also takes a majority vote over repeated
stochastic runs; that is a property of the prediction, not of one purification, so use
``Defense.predict(x, votes=GNS_CIFAR10_VOTES)``.

**Noise levels and SSNI.** The purifier is called as ``purifier(x, t)`` with ``t = policy(x)``.
Stage ``k`` of sample ``i`` runs at ``t_i * stage_k / reference_t`` (clipped to 1): the policy's
per-sample factor ``t(x) / t*`` scales every stage, and the score norm is computed once, by the
policy, on the input. ``reference_t`` is the policy's ``t*`` and defaults to the largest stage
level, so the published defense is ``Constant(max(stages))`` with factor 1, and SSNI with GNS is
``SSNI(model, t_star=gns.reference_t, ...)``.

Published CIFAR-10 setting (the authors' ``scripts/cifar10_pgd_gradual_noise.sh`` and
``test.py`` in github.com/ml-postech/robust-evaluation-of-diffusion-based-purification, read for
this module): defense stages 30, 30, 30, 30, 50, 50, 125, 125 of 1000 with as many DDPM steps
each (``step_size=1e-3`` here), 10 votes; attack surrogate stages 30, 50, 125 with 1, 1, 5
uniformly spaced DDPM steps (:meth:`GNS.surrogate`).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..deprecation import renamed_keywords
from .purifiers import DiffusionPurifier, Purification
from .sampling import reverse
from .score import ScoreModel

__all__ = [
    "GNS",
    "GNS_CIFAR10_STAGES",
    "GNS_CIFAR10_VOTES",
    "GNS_CIFAR10_SURROGATE_STAGES",
    "GNS_CIFAR10_SURROGATE_STEPS",
]

#: Stage levels of the published CIFAR-10 defense (steps of 1000).
GNS_CIFAR10_STAGES = (0.03, 0.03, 0.03, 0.03, 0.05, 0.05, 0.125, 0.125)
#: Majority-vote runs of the published CIFAR-10 defense.
GNS_CIFAR10_VOTES = 10
#: Stage levels of the published attack surrogate.
GNS_CIFAR10_SURROGATE_STAGES = (0.03, 0.05, 0.125)
#: Reverse steps per stage of the published attack surrogate.
GNS_CIFAR10_SURROGATE_STEPS = (1, 1, 5)


class GNS(DiffusionPurifier):
    """Gradual noise scheduling (Lee & Kim 2023) with a per-sample noise factor.

    ``purifier(x, t)``: ``x`` ``(B, C, H, W)`` in [0, 1], ``t`` ``(B,)`` (or a float) in
    [0, 1]; stage ``k`` runs at ``t * stages[k] / reference_t``. A sample with ``t = 0`` is
    returned unchanged. :meth:`run` also returns the network calls per sample, summed over
    stages. Defaults: the published CIFAR-10 defense (see module docs).

    Args:
        model: score model (epsilon prediction in [-1, 1] model space).
        stages: stage levels in (0, 1], applied in order.
        reference_t: the level ``t`` at which the stages run as given (the policy's ``t*``);
            default ``max(stages)``.
        reverse_steps: reverse steps per stage: None (``reverse_step_size`` spacing: a stage at
            level ``L`` takes ``ceil(L / reverse_step_size)`` steps), one int for every stage, or
            one int per stage (old keyword ``steps``).
        reverse_step_size: reverse step size in ``t`` when ``reverse_steps`` is None (old
            keyword ``step_size``).
        rule, eta, checkpoint: the reverse process, as in :class:`ssni.DiffPure`.
    """

    @renamed_keywords(steps="reverse_steps", step_size="reverse_step_size")
    def __init__(
        self,
        model: ScoreModel,
        *,
        stages: Sequence[float] = GNS_CIFAR10_STAGES,
        reference_t: Optional[float] = None,
        reverse_steps: Union[None, int, Sequence[int]] = None,
        reverse_step_size: float = 1e-3,
        rule: str = "ddpm",
        eta: Optional[float] = None,
        checkpoint: bool = False,
    ) -> None:
        super().__init__(
            model,
            rule=rule,
            eta=eta,
            reverse_steps=reverse_steps,
            reverse_step_size=reverse_step_size,
            checkpoint=checkpoint,
        )
        steps = reverse_steps
        stages = tuple(float(s) for s in stages)
        if not stages:
            raise ValueError("GNS needs at least one stage")
        if any(not 0.0 < s <= 1.0 for s in stages):
            raise ValueError(f"stage levels must lie in (0, 1] (0.03 = 30 of 1000), got {stages}")
        if reference_t is None:
            reference_t = max(stages)
        if not 0.0 < reference_t <= 1.0:
            raise ValueError(f"reference_t must be in (0, 1], got {reference_t}")
        if steps is None:
            per_stage = (None,) * len(stages)
        elif isinstance(steps, int):
            per_stage = (steps,) * len(stages)
        else:
            per_stage = tuple(int(n) for n in steps)
            if len(per_stage) != len(stages):
                raise ValueError(
                    f"reverse_steps has {len(per_stage)} entries for {len(stages)} stages; give "
                    "one per stage, a single int, or None"
                )
        if any(n is not None and n < 1 for n in per_stage):
            raise ValueError(f"reverse_steps must be >= 1, got {steps}")
        self.stages = stages
        self.reference_t = float(reference_t)
        self.stage_steps = per_stage

    @classmethod
    def surrogate(cls, model: ScoreModel, **kwargs) -> GNS:
        """The published attack surrogate: stages 30, 50, 125 of 1000 with 1, 1, 5 steps
        (``reference_t`` 0.125, as the defense's). Keyword arguments override."""
        kwargs.setdefault("stages", GNS_CIFAR10_SURROGATE_STAGES)
        if "steps" not in kwargs:
            kwargs.setdefault("reverse_steps", GNS_CIFAR10_SURROGATE_STEPS)
        return cls(model, **kwargs)

    def extra_repr(self) -> str:
        return f"stages={list(self.stages)}, reference_t={self.reference_t}, {super().extra_repr()}"

    def stage_levels(self, t: Tensor) -> Tensor:
        """``(S, B)`` levels of each stage for per-sample ``t`` ``(B,)`` (differentiable)."""
        ratios = torch.tensor(self.stages, dtype=t.dtype, device=t.device) / self.reference_t
        return (ratios[:, None] * t[None, :]).clamp(0.0, 1.0)

    def denoise(
        self, x_model: Tensor, t: Tensor, generator: Optional[torch.Generator] = None
    ) -> Purification:
        """All stages on model-space ``x_model`` ``(B, C, H, W)``; model space out (not clipped)."""
        schedule = self.model.schedule
        x = x_model
        nfe = torch.zeros(x_model.shape[0], dtype=torch.long, device=x_model.device)
        for level, n in zip(self.stage_levels(t), self.stage_steps):
            x_t, _ = schedule.perturb(x, level, generator=generator)
            out = reverse(
                self.model,
                x_t,
                level,
                rule=self.rule,
                steps=n,
                step_size=self.reverse_step_size,
                generator=generator,
                checkpoint=self.checkpoint,
            )
            x = out.x
            nfe = nfe + out.nfe
        return Purification(x, nfe)
