"""GDMP: guided diffusion model for purification (Wang et al. 2022, arXiv:2205.14969).

DiffPure whose reverse steps are guided toward the input: at every step from ``t`` to ``s``
the input ``x_in`` (model space) is noised to the current level,
``y_t = sqrt(alpha_bar(t)) x_in + sigma(t) z``, and the score is corrected by the gradient of a
distance ``d`` between the current sample ``x_t`` and ``y_t``:

    score'(x_t, t) = score(x_t, t) - s(t) grad_x d(x_t, y_t),
    i.e. eps' = eps + sigma(t) s(t) grad_x d(x_t, y_t),

and the step rule (DDPM by default) is applied to ``eps'``. Guiding through the score works with
every step rule; for the DDPM rule it shifts the step mean by ``beta_t / sqrt(1 - beta_t)``
times the correction, the reference's shift being ``Sigma_t`` times it (``Sigma_t`` its step
variance, ``beta_t`` for its CIFAR-10 model): the two agree to within about 1 %.
Several rounds (``rounds``) repeat noise-and-denoise on the previous round's output, always
guided toward the original input; rounds stay in model space, clipped to [0, 1] only at the end.

**Distance and scale convention.** ``d`` is a sum over the image's ``C*H*W`` entries:
``"mse"``: ``d = sum (x - y)^2`` (closed-form gradient ``2 (x - y)``); ``"ssim"``:
``d = sum (1 - SSIM map)`` (Gaussian window 11, sigma 1.5, ``L = 2``; gradient by autograd
with ``create_graph`` while gradients are enabled). ``s(t) = scale * w(t)`` with
``w(t) = sigma(t) / sqrt(alpha_bar(t))`` (``scale_schedule="gdmp"``), ``1`` (``"constant"``)
or a callable ``w(t)``.

Source: the authors' code (github.com/JinyiW/GuidedDiffusionPur, ``purification/diff_purify.py``
and ``pytorch_diffusion/diffusion.py``, read for this module) guides with
``grad_x (-F.mse_loss(x, y_t))`` times ``sqrt(1 - a_t) / (m sqrt(a_t))``,
``m = (2 ptb / 255) / 3 / guide_scale``, and adds ``Sigma_t`` times it to the DDPM mean;
``F.mse_loss`` averages over the whole batch as well as the pixels, so its guidance per
sample depends on the batch size. Its CIFAR-10 MSE configuration (``configs/cifar10_MSE.yml``:
``guide_scale 60000``, ``ptb 8``, batch 100, ``purify_step 36``, ``max_iter 4``) equals, per
sample and in the convention above, ``scale = 60000 * 3 / (16 / 255) / (100 * 3072) ~= 9.34``
(:data:`GDMP_CIFAR10_SCALE`), ``t* = 0.036``, ``rounds = 4``. Summing over pixels instead of
averaging keeps the per-pixel pull the same at every image size. The reference draws a fresh
``z`` for ``y_t`` at every step (the default here; ``fixed_guidance_noise=True`` draws one ``z``
per call instead). Its SSIM mode uses ``pytorch_ssim`` with ``L = 1`` constants on [-1, 1]
data; here ``L = 2``. The equations of the paper itself could not be checked against its text
here; the scale convention is taken from the code.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ..deprecation import renamed_keywords
from .diffusion import VPSchedule, expand_like
from .purifiers import DiffusionPurifier, Purification
from .sampling import StepRule, reverse
from .score import ScoreModel
from .ssim import ssim_map

__all__ = [
    "GDMP",
    "GDMP_CIFAR10_SCALE",
    "GDMP_CIFAR10_T_STAR",
    "GDMP_CIFAR10_ROUNDS",
    "mse_distance_grad",
    "ssim_distance_grad",
    "guided_step_rule",
]

#: Guidance scale equivalent to the reference's CIFAR-10 MSE setting (see module docs).
GDMP_CIFAR10_SCALE = 60000.0 * 3.0 / (2.0 * 8.0 / 255.0) / (100 * 3 * 32 * 32)
#: Noise level of the reference's CIFAR-10 setting: 36 of 1000 DDPM steps.
GDMP_CIFAR10_T_STAR = 0.036
#: Purification rounds of the reference's CIFAR-10 setting.
GDMP_CIFAR10_ROUNDS = 4

ScaleSchedule = Union[str, Callable[[Tensor], Tensor]]
DistanceGrad = Callable[[Tensor, Tensor], Tensor]


def mse_distance_grad(x: Tensor, y: Tensor) -> Tensor:
    """``grad_x sum((x - y)^2) = 2 (x - y)`` (closed form, differentiable in ``x`` and ``y``)."""
    return 2.0 * (x - y)


def ssim_distance_grad(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """``grad_x sum(1 - SSIM map(x, y))`` per image, ``(B, C, H, W)``.

    Computed with ``torch.autograd.grad``; while gradients are enabled and ``x`` or ``y`` needs
    them, the result keeps its graph (``create_graph=True``), so an attack differentiates through
    the guidance exactly.
    """
    keep_graph = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    with torch.enable_grad():
        xg = x if (keep_graph and x.requires_grad) else x.detach().requires_grad_(True)
        yg = y if keep_graph else y.detach()
        d = (1.0 - ssim_map(xg, yg, data_range=data_range)).sum()
        (grad,) = torch.autograd.grad(d, xg, create_graph=keep_graph)
    return grad if keep_graph else grad.detach()


def _schedule_weight(schedule_kind: ScaleSchedule, t: Tensor, vp: VPSchedule) -> Tensor:
    if callable(schedule_kind):
        return torch.as_tensor(schedule_kind(t), dtype=t.dtype, device=t.device).expand_as(t)
    if schedule_kind == "gdmp":
        return vp.sigma(t) / vp.alpha_bar(t).sqrt()
    return torch.ones_like(t)


def guided_step_rule(
    rule: StepRule,
    distance_grad: DistanceGrad,
    scale: float,
    *,
    channels: int,
    scale_schedule: ScaleSchedule = "gdmp",
    fixed_noise: bool = False,
) -> StepRule:
    """Wrap a step rule with GDMP guidance, acting on a carried state.

    The state is ``cat([x_t, x_in, z], dim=1)``: the sample (``channels`` channels), the input
    in model space, and (only if ``fixed_noise``) the guidance noise. Carrying the input with
    the sample lets :func:`ssni.core.sampling.reverse` index its active subset as usual. ``eps`` is
    the network's prediction for the sample channels (other channels ignored).
    """

    def step(
        eps: Tensor,
        x: Tensor,
        t: Tensor,
        s: Tensor,
        schedule: VPSchedule,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        xs = x[:, :channels]
        x_in = x[:, channels : 2 * channels]
        if fixed_noise:
            z = x[:, 2 * channels :]
        else:
            z = torch.randn(xs.shape, generator=generator, device=xs.device, dtype=xs.dtype)
        sig = expand_like(schedule.sigma(t), xs)
        y_t = expand_like(schedule.alpha_bar(t).sqrt(), xs) * x_in + sig * z
        weight = expand_like(scale * _schedule_weight(scale_schedule, t, schedule), xs)
        eps_guided = eps[:, :channels] + sig * weight * distance_grad(xs, y_t)
        out = rule(eps_guided, xs, t, s, schedule, generator)
        return torch.cat([out, x[:, channels:]], dim=1)

    return step


class _SampleChannels(ScoreModel):
    """The wrapped model's ``eps`` on the first ``channels`` channels, zeros on the rest."""

    def __init__(self, model: ScoreModel, channels: int) -> None:
        super().__init__(model.schedule)
        self.inner = model
        self.channels = channels

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        e = self.inner.eps(x[:, : self.channels], t)
        return torch.cat([e, torch.zeros_like(x[:, self.channels :])], dim=1)


class GDMP(DiffusionPurifier):
    """Guided diffusion purification (Wang et al. 2022) with one noise level per sample.

    ``purifier(x, t)``: ``x`` ``(B, C, H, W)`` in [0, 1], ``t`` ``(B,)`` (or a float) in [0, 1],
    the level of every round (with SSNI, ``t = policy(x)`` is already sample-specific). Returns
    images in [0, 1]; :meth:`run` also returns network calls per sample (``rounds`` times the
    steps of one round; guidance costs no network call). See the module docs for the guidance,
    its scale convention and sources. Published CIFAR-10 setting: ``Constant(0.036)`` policy
    (:data:`GDMP_CIFAR10_T_STAR`), ``rounds=4``, MSE guidance, ``scale ~= 9.34``, DDPM steps of
    1/1000. ``scale=0`` is DiffPure repeated ``rounds`` times.

    Args:
        model: score model (epsilon prediction in [-1, 1] model space).
        scale: guidance scale (>= 0) in the convention of the module docs.
        scale_schedule: ``"gdmp"`` (``sigma(t) / sqrt(alpha_bar(t))``), ``"constant"``, or a
            callable mapping ``(B,)`` times to ``(B,)`` weights.
        distance: ``"mse"`` or ``"ssim"``.
        rounds: purification rounds (noise and denoise), each from the same ``t``.
        fixed_guidance_noise: one ``z`` for ``y_t`` per call instead of a fresh one per step.
        rule, eta, reverse_steps, reverse_step_size, checkpoint: the reverse process, as in
            :class:`ssni.DiffPure`.
    """

    @renamed_keywords(steps="reverse_steps", step_size="reverse_step_size")
    def __init__(
        self,
        model: ScoreModel,
        *,
        scale: float = GDMP_CIFAR10_SCALE,
        scale_schedule: ScaleSchedule = "gdmp",
        distance: str = "mse",
        rounds: int = GDMP_CIFAR10_ROUNDS,
        fixed_guidance_noise: bool = False,
        rule: str = "ddpm",
        eta: Optional[float] = None,
        reverse_steps: Optional[int] = None,
        reverse_step_size: float = 1e-3,
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
        if not scale >= 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        if distance not in ("mse", "ssim"):
            raise ValueError(f"distance must be 'mse' or 'ssim', got {distance!r}")
        if not callable(scale_schedule) and scale_schedule not in ("gdmp", "constant"):
            raise ValueError(
                f"scale_schedule must be 'gdmp', 'constant' or a callable, got {scale_schedule!r}"
            )
        if int(rounds) != rounds or rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {rounds}")
        self.scale = float(scale)
        self.scale_schedule = scale_schedule
        self.distance = distance
        self.rounds = int(rounds)
        self.fixed_guidance_noise = bool(fixed_guidance_noise)

    def extra_repr(self) -> str:
        sched = self.scale_schedule if isinstance(self.scale_schedule, str) else "callable"
        return (
            f"scale={self.scale:.4g}, scale_schedule={sched!r}, distance={self.distance!r}, "
            f"rounds={self.rounds}, {super().extra_repr()}"
        )

    def _reverse(self, model: ScoreModel, x_t: Tensor, t: Tensor, rule: StepRule, generator):
        return reverse(
            model,
            x_t,
            t,
            rule=rule,
            steps=self.reverse_steps,
            step_size=self.reverse_step_size,
            generator=generator,
            checkpoint=self.checkpoint,
        )

    def denoise(
        self, x_model: Tensor, t: Tensor, generator: Optional[torch.Generator] = None
    ) -> Purification:
        """All rounds on model-space ``x_model`` ``(B, C, H, W)`` at levels ``t`` ``(B,)``;
        model space out (not clipped)."""
        schedule = self.model.schedule
        channels = x_model.shape[1]
        guided = self.scale > 0
        if guided:
            grad_fn = mse_distance_grad if self.distance == "mse" else ssim_distance_grad
            model = _SampleChannels(self.model, channels)
            rule = guided_step_rule(
                self.rule,
                grad_fn,
                self.scale,
                channels=channels,
                scale_schedule=self.scale_schedule,
                fixed_noise=self.fixed_guidance_noise,
            )
            carried = [x_model]
            if self.fixed_guidance_noise:
                carried.append(
                    torch.randn(
                        x_model.shape,
                        generator=generator,
                        device=x_model.device,
                        dtype=x_model.dtype,
                    )
                )
        x = x_model
        nfe = torch.zeros(x_model.shape[0], dtype=torch.long, device=x_model.device)
        for _ in range(self.rounds):
            x_t, _ = schedule.perturb(x, t, generator=generator)
            if guided:
                out = self._reverse(model, torch.cat([x_t, *carried], 1), t, rule, generator)
                x = out.x[:, :channels]
            else:
                out = self._reverse(self.model, x_t, t, self.rule, generator)
                x = out.x
            nfe = nfe + out.nfe
        return Purification(x, nfe)
