"""Noise-level policies: ``policy(x) -> t``, one diffusion level per sample.

:class:`Constant` is the usual DBP setting (one ``t*`` for the batch). :class:`SSNI` implements
Sample-specific Score-aware Noise Injection (Sun et al., ICML 2025): the norm of the expected
perturbation score (EPS) of each input is mapped to its own level by a reweighting function,
SSNI-N (sigmoid) or SSNI-L (linear).
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..deprecation import renamed_attribute, renamed_keywords
from .purifiers import to_model_space
from .score import ScoreModel
from .validation import check_images, check_model_input

__all__ = [
    "NoiseLevelPolicy",
    "Constant",
    "SSNI",
    "eps_score_norm",
    "eps_probe",
    "REWEIGHT",
    "POLICY_NAME",
    "PROBE_MIN_CHUNK",
]

#: Policy name (as in configurations and policy files) -> SSNI ``reweight``.
REWEIGHT = {"ssni-n": "sigmoid", "ssni-l": "linear"}
#: SSNI ``reweight`` -> policy name.
POLICY_NAME = {v: k for k, v in REWEIGHT.items()}

#: Smallest default number of images per network call of the EPS probe (small batches are
#: slow per image; see :func:`eps_probe`).
PROBE_MIN_CHUNK = 64


class NoiseLevelPolicy(nn.Module):
    """Maps images ``(B, C, H, W)`` in [0, 1] to levels ``(B,)`` in [0, 1]."""

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def levels_and_norms(
        self, x: Tensor, generator: Optional[torch.Generator] = None
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """``(t, e)``: the levels ``(B,)`` of :meth:`forward` (same random draws) and the score
        norms ``(B,)`` they came from, or None for policies without one."""
        return self(x, generator=generator), None


class Constant(NoiseLevelPolicy):
    """The same level ``t_star`` (in [0, 1]; 0.1 is step 100 of 1000) for every sample."""

    def __init__(self, t_star: float = 0.1) -> None:
        super().__init__()
        if not 0.0 < t_star <= 1.0:
            raise ValueError(f"t_star must be in (0, 1], got {t_star}")
        self.t_star = float(t_star)

    def extra_repr(self) -> str:
        return f"t_star={self.t_star}"

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        check_images(x)
        return torch.full((x.shape[0],), self.t_star, device=x.device, dtype=x.dtype)


@renamed_keywords(levels="probe_levels")
def eps_probe(
    model: ScoreModel,
    x: Tensor,
    *,
    probe_levels: int = 20,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """The EPS probe of SSNI: ``(e, level_norms)``.

    ``t_k = k / N`` for ``k = 1..K`` (``N`` the schedule's grid, 1000), ``x_k`` the input
    perturbed to ``t_k`` with fresh noise (all drawn at once), ``s_k = s(x_k, t_k)``. The
    ``K x B`` copies go through the network in calls of at most ``chunk_size`` images (the norms
    do not depend on the chunking). ``chunk_size=None`` chooses ``max(B, PROBE_MIN_CHUNK)``
    rounded to whole levels: calls as large as a reverse step's (one call of ``K x B`` images was
    measured 2-3x slower per image on CPU); ``0`` makes one call.

    ``probe_levels`` is K (old keyword ``levels``).

    Returns:
        ``e`` ``(B,)``: ``||(1/K) sum_k s_k||_2`` (the EPS norm); ``level_norms`` ``(B, K)``:
        ``||s_k||_2`` for each level, norms over all ``C*H*W`` entries.
    """
    if probe_levels < 1:
        raise ValueError(f"probe_levels must be >= 1, got {probe_levels}")
    levels = int(probe_levels)
    schedule = model.schedule
    b = x.shape[0]
    x0 = to_model_space(x).repeat(levels, 1, 1, 1)  # level-major: rows k*B .. (k+1)*B - 1
    t = torch.arange(1, levels + 1, device=x.device, dtype=x.dtype) / schedule.num_steps
    t = t.repeat_interleave(b)
    x_k, _ = schedule.perturb(x0, t, generator=generator)
    if chunk_size is None:
        chunk_size = -(-max(b, PROBE_MIN_CHUNK) // b) * b
    if chunk_size == 0 or chunk_size >= x_k.shape[0]:
        scores = model.score(x_k, t)
    else:
        scores = torch.cat(
            [
                model.score(x_k[i : i + chunk_size], t[i : i + chunk_size])
                for i in range(0, x_k.shape[0], chunk_size)
            ]
        )
    scores = scores.reshape(levels, b, -1)
    return scores.mean(0).norm(dim=1), scores.norm(dim=2).transpose(0, 1)


@renamed_keywords(levels="probe_levels")
def eps_score_norm(
    model: ScoreModel,
    x: Tensor,
    *,
    probe_levels: int = 20,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Norm of the expected perturbation score, ``e(x) = ||(1/K) sum_k s(x_k, t_k)||_2``.

    ``t_k = k / N`` for ``k = 1..K`` (``N`` the schedule's grid, 1000), ``x_k`` the input
    perturbed to ``t_k`` with fresh noise (see :func:`eps_probe`, which also returns the
    per-level norms).

    Args:
        model: score model in [-1, 1] model space.
        x: images ``(B, C, H, W)`` in [0, 1].
        probe_levels: K (20 for CIFAR-10 in the paper, 50 for ImageNet); old keyword ``levels``.
        generator: source of the perturbation noise (makes ``e(x)`` reproducible).

    Returns:
        ``(B,)`` norms over all ``C*H*W`` entries.
    """
    return eps_probe(
        model, x, probe_levels=probe_levels, generator=generator, chunk_size=chunk_size
    )[0]


class CleanNormStatistics:
    """Mixin for policies that keep the clean EPS-norm statistics (mean, std, min, max, count)
    as buffers ``norm_mean``, ``norm_std``, ``norm_min``, ``norm_max``, ``norm_count`` (NaN and 0
    until set): SSNI's reweighting reads them, and the constrained attack takes its norm target
    from them (:func:`ssni.attacks.norm.clean_norm_target`)."""

    def _register_norm_statistics(self) -> None:
        nan = torch.tensor(float("nan"))
        for name in ("norm_mean", "norm_std", "norm_min", "norm_max"):
            self.register_buffer(name, nan.clone())
        self.register_buffer("norm_count", torch.tensor(0, dtype=torch.long))

    @property
    def has_statistics(self) -> bool:
        """Whether the clean statistics are set."""
        return int(self.norm_count) > 1 and bool(torch.isfinite(self.norm_std))

    def set_statistics(self, norms: Tensor) -> None:
        """Set the clean statistics from a 1-D tensor of clean norms (at least two, finite,
        not all equal: a std of 0 would send every input to the same level)."""
        e = norms.detach().double().flatten()
        if e.numel() < 2 or not bool(torch.isfinite(e).all()):
            raise ValueError(f"clean statistics need >= 2 finite norms, got {e.tolist()[:4]}...")
        if float(e.std()) == 0.0:
            raise ValueError(
                f"the {e.numel()} clean score norms are all equal ({float(e[0]):.6g}, std 0): "
                "every input would get the same level; the score model or the clean images are "
                "degenerate (a constant model, or copies of one image)"
            )
        self.norm_mean.fill_(float(e.mean()))
        self.norm_std.fill_(float(e.std()))
        self.norm_min.fill_(float(e.min()))
        self.norm_max.fill_(float(e.max()))
        self.norm_count.fill_(e.numel())

    def statistics(self) -> dict:
        """The clean statistics as plain floats (NaN and count 0 while unset)."""
        return {
            "mean": float(self.norm_mean),
            "std": float(self.norm_std),
            "min": float(self.norm_min),
            "max": float(self.norm_max),
            "count": int(self.norm_count),
        }


class SSNI(CleanNormStatistics, NoiseLevelPolicy):
    """Sample-specific Score-aware Noise Injection (Sun et al., ICML 2025).

    ``e = ||EPS(x)||`` (see :func:`eps_score_norm`), then

    * ``reweight="sigmoid"`` (SSNI-N): ``t = sigmoid((e - mu) / tau) (t* + b)``, in ``[0, t* + b]``;
    * ``reweight="linear"`` (SSNI-L): ``t = clip((e - e_min) / (e_max - e_min), 0, 1) t* + b``,
      in ``[b, t* + b]``, with ``mu``, ``e_min``, ``e_max`` statistics of clean norms from
      :meth:`fit`. ``batch_joined=True`` instead takes ``e_min``/``e_max`` over the clean
      statistics joined with the current batch, as the reference code does (a sample's level then
      depends on its batch).

    Levels are rounded to the ``1 / N`` grid and clipped to [0, 1]. ``tau`` and ``b`` are not
    stated in the paper; ``tau=None`` uses the std of the clean norms. Calibrate both on
    validation data (``ssni calibrate``). ``t_star`` and ``bias`` are in units of ``t``
    (0.1 = 100 of 1000 steps).

    Args:
        model: score model used for the EPS probe.
        t_star: base level ``t*``.
        reweight: ``"sigmoid"`` (SSNI-N) or ``"linear"`` (SSNI-L).
        tau: sigmoid temperature in raw norm units (None: std of clean norms).
        bias: ``b``.
        probe_levels: K, number of perturbation levels of the EPS probe (old keyword
            ``levels``).
        batch_joined: SSNI-L only, reproduce the reference's batch-dependent min/max.
        differentiable: keep the graph through the EPS norm and use straight-through rounding,
            so that ``t`` has a gradient w.r.t. ``x`` (for adaptive attacks). Off by default:
            the probe runs without gradients, as in the reference.
        chunk_size: largest batch per network call of the probe (None: chosen from the batch
            size, see :func:`eps_score_norm`; 0: one call of ``K x B`` images).
        probe_size: run the probe on the input resized (bilinear) to this height = width, the
            size the score model takes (ImageNet: 224 images, 256 model); None: as given.
    """

    @renamed_keywords(levels="probe_levels")
    def __init__(
        self,
        model: ScoreModel,
        *,
        t_star: float = 0.1,
        reweight: str = "sigmoid",
        tau: Optional[float] = None,
        bias: float = 0.0,
        probe_levels: int = 20,
        batch_joined: bool = False,
        differentiable: bool = False,
        chunk_size: Optional[int] = None,
        probe_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if reweight not in ("sigmoid", "linear"):
            raise ValueError(
                f"reweight must be 'sigmoid' (SSNI-N) or 'linear' (SSNI-L), got {reweight!r}"
            )
        if not 0.0 < t_star <= 1.0:
            raise ValueError(f"t_star must be in (0, 1], got {t_star}")
        if tau is not None and not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if not 0.0 < t_star + bias <= 1.0:
            raise ValueError(f"t_star + bias must be in (0, 1], got {t_star + bias}")
        if reweight == "linear" and bias < 0:
            raise ValueError(
                f"SSNI-L needs bias >= 0 (levels in [bias, t_star + bias]), got {bias}"
            )
        if batch_joined and reweight != "linear":
            raise ValueError("batch_joined applies to reweight='linear' only")
        if probe_levels < 1:
            raise ValueError(f"probe_levels must be >= 1, got {probe_levels}")
        self.model = model
        self.t_star = float(t_star)
        self.reweight = reweight
        self.tau = None if tau is None else float(tau)
        self.bias = float(bias)
        self.probe_levels = int(probe_levels)
        self.batch_joined = bool(batch_joined)
        self.differentiable = bool(differentiable)
        self.chunk_size = chunk_size
        self.probe_size = None if not probe_size else int(probe_size)
        self._register_norm_statistics()

    #: Old name (the ``levels=`` keyword is deprecated).
    levels = renamed_attribute("probe_levels")

    def extra_repr(self) -> str:
        return (
            f"reweight={self.reweight!r}, t_star={self.t_star}, tau={self.tau}, bias={self.bias}, "
            f"levels={self.probe_levels}, batch_joined={self.batch_joined}, "
            f"{f'probe_size={self.probe_size}, ' if self.probe_size else ''}"
            f"differentiable={self.differentiable}, fitted={self.fitted}"
        )

    @property
    def fitted(self) -> bool:
        return self.has_statistics

    @property
    def max_level(self) -> float:
        """Largest level the policy can return, ``min(1, t* + b)``."""
        return min(1.0, self.t_star + self.bias)

    def score_norm(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """``(B,)`` EPS norms of images ``x`` in [0, 1] (resized to ``probe_size`` if set)."""
        check_images(x)
        if self.probe_size and tuple(x.shape[-2:]) != (self.probe_size, self.probe_size):
            x = torch.nn.functional.interpolate(
                x, size=(self.probe_size, self.probe_size), mode="bilinear", align_corners=False
            )
        check_model_input(x, self.model, "score model")
        return eps_score_norm(
            self.model,
            x,
            probe_levels=self.probe_levels,
            generator=generator,
            chunk_size=self.chunk_size,
        )

    @torch.no_grad()
    def fit(
        self,
        batches: Iterable[Union[Tensor, tuple]],
        generator: Optional[torch.Generator] = None,
    ) -> SSNI:
        """Store mean/std/min/max of the clean norms over ``batches`` (images, or tuples whose
        first item is images). Use held-out clean data, never the test set. Returns ``self``."""
        norms = []
        for batch in batches:
            xb = batch[0] if isinstance(batch, (tuple, list)) else batch
            xb = xb.to(device=self.norm_mean.device)
            norms.append(self.score_norm(xb, generator=generator).double())
        if not norms:
            raise ValueError("fit() needs at least one batch of clean images")
        e = torch.cat(norms)
        if e.numel() < 2:
            raise ValueError("fit() needs at least two clean images")
        self.set_statistics(e)
        return self

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError(
                "SSNI policy has no clean score-norm statistics: call policy.fit(clean_batches) "
                "on held-out clean images (or load a fitted state_dict) before using it"
            )

    def level_from_norm(self, e: Tensor) -> Tensor:
        """Unrounded level ``(B,)`` for norms ``e`` (differentiable in ``e``)."""
        self._require_fitted()
        mu = self.norm_mean.to(e.dtype)
        if self.reweight == "sigmoid":
            tau = self.tau if self.tau is not None else float(self.norm_std)
            t = torch.sigmoid((e - mu) / tau) * (self.t_star + self.bias)
        else:
            lo = self.norm_min.to(e.dtype)
            hi = self.norm_max.to(e.dtype)
            if self.batch_joined:
                lo = torch.minimum(lo, e.detach().min())
                hi = torch.maximum(hi, e.detach().max())
            frac = ((e - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0)
            t = frac * self.t_star + self.bias
        return t.clamp(0.0, 1.0)

    def quantize(self, t: Tensor) -> Tensor:
        """Round to the schedule's ``1 / N`` grid; straight-through when differentiable."""
        t_round = self.model.schedule.quantize(t.detach())
        if self.differentiable:
            return t + (t_round - t).detach()
        return t_round

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Levels ``(B,)`` in ``[0, min(1, t* + b)]`` on the ``1 / N`` grid."""
        return self.levels_and_norms(x, generator=generator)[0]

    def levels_and_norms(
        self, x: Tensor, generator: Optional[torch.Generator] = None
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """``(t, e)``: levels ``(B,)`` as :meth:`forward` and the EPS norms ``(B,)`` behind them."""
        self._require_fitted()
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            e = self.score_norm(x, generator=generator)
            return self.quantize(self.level_from_norm(e)), e
