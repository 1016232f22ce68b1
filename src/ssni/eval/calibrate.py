"""Choosing SSNI's ``tau`` and ``b`` on validation data, and policy files.

The paper does not state ``tau`` (sigmoid temperature, raw norm units) or ``b`` (bias, in units of
``t``). :func:`calibrate` picks them by grid search on held-out clean images and adversarial
versions of them, never on test data:

1. the policy's clean score-norm statistics are fitted on one part of the validation split;
2. on a disjoint part, every image (clean and adversarial) is purified at each level of a grid of
   constant levels and the classifier's correctness is recorded (a *table*); the EPS norm of each
   image is computed once;
3. for every ``(tau, b)`` the levels ``t(x)`` follow from the norms, are snapped to the table's
   grid, and clean/robust accuracy are read off the table, so the grid search costs no further
   network calls;
4. the pair maximising clean accuracy subject to ``robust >= min_robust`` (default: the robust
   accuracy of the constant-``t*`` defense on the same images) is chosen, or the pair maximising
   ``w * clean + (1 - w) * robust``.

The adversarial images are supplied by the caller (``ssni calibrate`` crafts them with a cheap
attack against the constant-``t*`` defense: a transfer setting, stated in its output). Policy
files are JSON (``.json``) or safetensors (``.safetensors``) and load with :func:`load_policy`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..core.learned import LearnedPolicy, feature_names
from ..core.policies import POLICY_NAME, REWEIGHT, SSNI, Constant, NoiseLevelPolicy
from ..core.purifiers import Purifier
from ..core.score import ScoreModel
from ..io.files import replacing, write_text_atomic
from .analysis import correctness_grid

__all__ = [
    "POLICY_FORMAT",
    "POLICY_KINDS",
    "save_policy",
    "read_policy_file",
    "load_policy",
    "policy_state",
    "CalibrationResult",
    "calibrate",
    "select",
    "admissible_biases",
    "snap",
    "level_grid",
    "correctness_table",
]

log = logging.getLogger(__name__)

POLICY_FORMAT = "ssni-policy"
POLICY_VERSION = 1
PathLike = Union[str, "os.PathLike[str]"]
Progress = Optional[Callable[[int], None]]
#: Every policy kind a policy file (and the ``policy`` configuration key) can name.
POLICY_KINDS = ("constant", "ssni-n", "ssni-l", "ssni-learned")


# ----------------------------------------------------------------------------- policy files


def policy_state(policy: NoiseLevelPolicy) -> Dict[str, Any]:
    """The settings and clean statistics of a policy as a JSON-able dictionary."""
    if isinstance(policy, Constant):
        return {"policy": "constant", "t_star": policy.t_star}
    if isinstance(policy, SSNI):
        if not policy.fitted:
            raise ValueError("the SSNI policy has no clean statistics; fit it before saving")
        return {
            "policy": POLICY_NAME[policy.reweight],
            "t_star": policy.t_star,
            "tau": policy.tau,
            "bias": policy.bias,
            "levels": policy.probe_levels,
            "batch_joined": policy.batch_joined,
            **({"probe_size": policy.probe_size} if policy.probe_size else {}),
            "statistics": policy.statistics(),
        }
    if isinstance(policy, LearnedPolicy):
        if not policy.fitted:
            raise ValueError("the learned policy has no feature statistics; train it first")
        return {
            "policy": "ssni-learned",
            "t_star": policy.t_star,
            "bias": policy.bias,
            "t_min": policy.t_min,
            "levels": policy.levels,
            "hidden": policy.hidden,
            "features": feature_names(policy.levels),
            **({"statistics": policy.statistics()} if policy.has_statistics else {}),
        }
    raise ValueError(f"cannot save a {type(policy).__name__} policy")


def _learned_tensors(policy: LearnedPolicy) -> Dict[str, Tensor]:
    """The learned policy's own state (network, feature statistics and, when set, the clean
    norm statistics; not the score model)."""
    return {
        k: v.detach().cpu().contiguous()
        for k, v in policy.state_dict().items()
        if not k.startswith("model.") and (policy.has_statistics or not k.startswith("norm_"))
    }


def save_policy(
    path: PathLike, policy: NoiseLevelPolicy, *, info: Optional[Mapping[str, Any]] = None
) -> Path:
    """Write ``policy`` (settings, clean statistics and ``info``) as JSON or safetensors,
    chosen by the file's suffix."""
    path = Path(path)
    doc = {"format": POLICY_FORMAT, "version": POLICY_VERSION, **policy_state(policy)}
    if info:
        doc["info"] = dict(info)
    if isinstance(policy, LearnedPolicy) and path.suffix != ".safetensors":
        raise ValueError(f"a learned policy is saved as .safetensors, got {path.name}")
    if path.suffix != ".safetensors":
        return write_text_atomic(path, json.dumps(doc, indent=2, default=float) + "\n")
    from safetensors.torch import save_file

    if isinstance(policy, LearnedPolicy):
        tensors = _learned_tensors(policy)
    else:
        stats = doc.get("statistics", {})
        tensors = {
            f"norm_{k}": torch.tensor([float(stats[k])], dtype=torch.float64)
            for k in ("mean", "std", "min", "max")
            if k in stats
        } or {"t_star": torch.tensor([float(doc["t_star"])], dtype=torch.float64)}
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata={POLICY_FORMAT: json.dumps(doc, default=float)})
    return path


def read_policy_file(path: PathLike) -> Dict[str, Any]:
    """The dictionary stored in a policy file (JSON or safetensors); checks its format."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"policy file {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"policy file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: one clear line
            raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
        if POLICY_FORMAT not in meta:
            raise ValueError(f"{path} is not an ssni policy file (no '{POLICY_FORMAT}' metadata)")
        doc = json.loads(meta[POLICY_FORMAT])
    else:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != POLICY_FORMAT:
        raise ValueError(f"{path} is not an ssni policy file (format != {POLICY_FORMAT!r})")
    if doc.get("policy") not in POLICY_KINDS:
        raise ValueError(f"{path}: unknown policy {doc.get('policy')!r}")
    return doc


def load_policy(
    path: PathLike, model: ScoreModel, *, chunk_size: Optional[int] = None
) -> NoiseLevelPolicy:
    """Rebuild the policy of a file written by :func:`save_policy` around score ``model``."""
    doc = read_policy_file(path)
    if doc["policy"] == "constant":
        return Constant(float(doc["t_star"]))
    if doc["policy"] == "ssni-learned":
        return _load_learned(Path(path), doc, model, chunk_size)
    policy = SSNI(
        model,
        t_star=float(doc["t_star"]),
        reweight=REWEIGHT[doc["policy"]],
        tau=None if doc.get("tau") is None else float(doc["tau"]),
        bias=float(doc.get("bias", 0.0)),
        probe_levels=int(doc.get("levels", 20)),
        batch_joined=bool(doc.get("batch_joined", False)),
        probe_size=doc.get("probe_size"),
        chunk_size=chunk_size,
    )
    stats = doc.get("statistics")
    keys = ("mean", "std", "min", "max", "count")
    if not isinstance(stats, dict) or not all(_is_number(stats.get(k)) for k in keys):
        raise ValueError(
            f"{path}: an {doc['policy']} policy file needs 'statistics' with numbers "
            f"{', '.join(keys)} (the clean score-norm statistics); write it with `ssni calibrate`"
        )
    if not int(stats["count"]) >= 2 or not float(stats["std"]) > 0:
        raise ValueError(
            f"{path}: its clean statistics are degenerate (count {stats['count']}, std "
            f"{stats['std']}); every input would get the same level"
        )
    policy.norm_mean.fill_(float(stats["mean"]))
    policy.norm_std.fill_(float(stats["std"]))
    policy.norm_min.fill_(float(stats["min"]))
    policy.norm_max.fill_(float(stats["max"]))
    policy.norm_count.fill_(int(stats["count"]))
    return policy


def _load_learned(
    path: Path, doc: Dict[str, Any], model: ScoreModel, chunk_size: Optional[int]
) -> LearnedPolicy:
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a learned policy is stored as .safetensors")
    policy = LearnedPolicy(
        model,
        t_star=float(doc["t_star"]),
        bias=float(doc.get("bias", 0.0)),
        levels=int(doc["levels"]),
        hidden=int(doc["hidden"]),
        chunk_size=chunk_size,
        t_min=float(doc.get("t_min", 0.0)),  # files without a floor: none
    )
    tensors = load_file(str(path))
    expected = {k for k in policy.state_dict() if not k.startswith("model.")}
    # files written before the clean norm statistics were recorded lack them (statistics()
    # then asks for a retrained file); everything else must match
    optional = {k for k in expected if k.startswith("norm_")}
    partial = bool(optional & set(tensors)) and not optional <= set(tensors)
    if partial or not (expected - optional <= set(tensors) <= expected):
        missing = sorted(expected - (set() if partial else optional) - set(tensors))[:3]
        unexpected = sorted(set(tensors) - expected)[:3]
        raise ValueError(
            f"{path}: tensors do not match (missing {missing}, unexpected {unexpected})"
        )
    policy.load_state_dict(tensors, strict=False)
    for p in policy.parameters():
        p.requires_grad_(False)
    return policy.eval()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ----------------------------------------------------------------------------- calibration


def snap(t: Tensor, grid: Tensor) -> Tensor:
    """Index ``(B,)`` of the nearest grid level for each level in ``t`` (ties: lower level)."""
    d = (t.detach().double()[:, None] - grid.double()[None, :]).abs()
    return d.argmin(1)


def level_grid(t_star: float, biases: Sequence[float], resolution: float = 0.01) -> Tensor:
    """Levels of the correctness table: 0, ``t*`` and multiples of ``resolution`` up to the
    largest ``t* + b`` (float64, increasing)."""
    top = max(t_star + float(b) for b in biases)
    steps = int(math.ceil(top / resolution - 1e-9))
    values = {0.0, round(t_star, 6)} | {round(k * resolution, 6) for k in range(1, steps + 1)}
    return torch.tensor(sorted(v for v in values if v <= 1.0), dtype=torch.float64)


@dataclass
class CalibrationResult:
    """Everything :func:`calibrate` measured; ``table`` has one entry per ``(tau, bias)``."""

    policy: str
    t_star: float
    objective: str
    min_robust: float
    weight: float
    statistics: Dict[str, float]
    baseline: Dict[str, float]
    chosen: Dict[str, Any]
    table: List[Dict[str, Any]] = field(default_factory=list)
    t_grid: List[float] = field(default_factory=list)
    n_stats: int = 0
    n_calibration: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def _norms(policy: SSNI, x: Tensor, batch_size: int, generator, progress: Progress) -> Tensor:
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        out.append(policy.score_norm(xb, generator=generator).double().cpu())
        if progress is not None:
            progress(xb.shape[0])
    return torch.cat(out)


@torch.no_grad()
def correctness_table(
    purifier: Purifier,
    classifier: nn.Module,
    x: Tensor,
    y: Tensor,
    grid: Tensor,
    *,
    votes: int,
    batch_size: int,
    generator,
    progress: Progress,
) -> Tensor:
    """Correctness ``(N, T)`` over ``grid``; a level 0 means no purification."""
    cols = []
    positive = grid[grid > 0]
    if bool((grid <= 0).any()):
        preds = torch.cat(
            [classifier(x[i : i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)]
        )
        cols.append((preds == y).cpu()[:, None])
    if positive.numel():
        cols.append(
            correctness_grid(
                purifier,
                classifier,
                x,
                y,
                positive,
                votes=votes,
                batch_size=batch_size,
                generator=generator,
                progress=progress,
            ).cpu()
        )
    return torch.cat(cols, dim=1)


def _with(policy: SSNI, tau: float, bias: float) -> SSNI:
    other = copy.copy(policy)
    other.tau = float(tau)
    other.bias = float(bias)
    return other


def calibrate(
    policy: SSNI,
    purifier: Purifier,
    classifier: nn.Module,
    x_stats: Tensor,
    x_cal: Tensor,
    y_cal: Tensor,
    x_adv: Tensor,
    *,
    taus: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
    biases: Sequence[float] = (0.0, 0.025, 0.05, 0.1),
    objective: str = "constrained",
    min_robust: float = -1.0,
    weight: float = 0.5,
    resolution: float = 0.01,
    votes: int = 1,
    batch_size: int = 64,
    generator: Optional[torch.Generator] = None,
    progress: Progress = None,
) -> CalibrationResult:
    """Fit ``policy`` on ``x_stats`` and set its ``tau`` and ``bias`` by grid search.

    Args:
        policy: an :class:`~ssni.SSNI` policy (``t_star``, ``reweight``, ``levels`` are kept).
        purifier, classifier: the defense's parts.
        x_stats: clean validation images for the score-norm statistics.
        x_cal, y_cal: other clean validation images and labels (disjoint from ``x_stats``).
        x_adv: adversarial versions of ``x_cal``.
        taus: candidate ``tau`` as multiples of the clean norm std (ignored by SSNI-L).
        biases: candidate ``b`` in units of ``t`` (negative values are skipped for SSNI-L and
            wherever ``t* + b`` leaves (0, 1]).
        objective: ``"constrained"`` (max clean accuracy with ``robust >= min_robust``) or
            ``"weighted"`` (max ``weight * clean + (1 - weight) * robust``).
        min_robust: the robust-accuracy floor; negative: the constant-``t*`` defense's robust
            accuracy on the same images.
        resolution: spacing of the table's levels (levels are snapped to it).
        votes, batch_size, generator: for the purifications.
        progress: called with a count of finished images (statistics, norms, purifications;
            ``n_stats + 2 n_cal (1 + levels)`` in all, ``levels`` the positive entries of
            :func:`level_grid`).

    Returns:
        :class:`CalibrationResult`; ``policy`` is fitted and holds the chosen ``tau``/``bias``.
    """
    if not isinstance(policy, SSNI):
        raise ValueError(f"calibrate needs an SSNI policy, got {type(policy).__name__}")
    if objective not in ("constrained", "weighted"):
        raise ValueError(f"objective must be 'constrained' or 'weighted', got {objective!r}")
    if x_adv.shape != x_cal.shape:
        raise ValueError("x_adv must have the shape of x_cal")
    if not resolution > 0:
        raise ValueError(f"resolution must be > 0, got {resolution}")

    def stats_batches():
        for i in range(0, x_stats.shape[0], batch_size):
            yield x_stats[i : i + batch_size]
            if progress is not None:
                progress(x_stats[i : i + batch_size].shape[0])

    policy.fit(stats_batches(), generator=generator)
    e_clean = _norms(policy, x_cal, batch_size, generator, progress)
    e_adv = _norms(policy, x_adv, batch_size, generator, progress)
    grid = level_grid(policy.t_star, admissible_biases(policy, biases), resolution)
    table_kw = dict(votes=votes, batch_size=batch_size, generator=generator, progress=progress)
    clean_tab = correctness_table(purifier, classifier, x_cal, y_cal, grid, **table_kw)
    adv_tab = correctness_table(purifier, classifier, x_adv, y_cal, grid, **table_kw)
    return select(
        policy, e_clean, e_adv, clean_tab, adv_tab, grid,
        taus=taus, biases=biases, objective=objective, min_robust=min_robust, weight=weight,
        n_stats=int(x_stats.shape[0]),
    )


def admissible_biases(policy: SSNI, biases: Sequence[float]) -> List[float]:
    """The biases with ``0 < t* + b <= 1`` (and ``b >= 0`` for SSNI-L); ValueError if none."""
    linear = policy.reweight == "linear"
    out = []
    for b in biases:
        top = policy.t_star + float(b)
        if not 0.0 < top <= 1.0 or (linear and b < 0):
            log.info("skipping bias %g (t* + b = %g, policy %s)", b, top, policy.reweight)
            continue
        out.append(float(b))
    if not out:
        raise ValueError("no admissible (tau, bias) pair in the grid")
    return out


def select(
    policy: SSNI,
    e_clean: Tensor,
    e_adv: Tensor,
    clean_tab: Tensor,
    adv_tab: Tensor,
    grid: Tensor,
    *,
    taus: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
    biases: Sequence[float] = (0.0, 0.025, 0.05, 0.1),
    objective: str = "constrained",
    min_robust: float = -1.0,
    weight: float = 0.5,
    n_stats: int = 0,
) -> CalibrationResult:
    """The grid search of :func:`calibrate` on precomputed inputs: EPS norms ``(N,)`` of the
    clean and adversarial calibration images, their correctness tables ``(N, T)`` over the
    levels ``grid`` ``(T,)`` (0 = no purification; see :func:`level_grid`). ``policy`` must be
    fitted; it receives the chosen ``tau`` and ``bias``."""
    if objective not in ("constrained", "weighted"):
        raise ValueError(f"objective must be 'constrained' or 'weighted', got {objective!r}")
    std = float(policy.norm_std)
    linear = policy.reweight == "linear"
    tau_values = [None] if linear else [float(m) * std for m in taus]
    pairs = [
        (tau, b)
        for b in admissible_biases(policy, biases)
        for tau in tau_values
        if tau is None or tau > 0
    ]
    if not pairs:
        raise ValueError("no admissible (tau, bias) pair in the grid")
    grid = torch.as_tensor(grid, dtype=torch.float64)
    rows = torch.arange(clean_tab.shape[0])

    def accuracy(tab: Tensor, t: Tensor) -> float:
        return float(tab[rows, snap(t, grid)].double().mean())

    t_star_col = snap(torch.tensor([policy.t_star]), grid)
    baseline = {
        "clean_acc": float(clean_tab[:, t_star_col].double().mean()),
        "robust_acc": float(adv_tab[:, t_star_col].double().mean()),
        "t": policy.t_star,
    }
    floor = baseline["robust_acc"] if min_robust < 0 else float(min_robust)

    table = []
    for tau, b in pairs:
        cand = _with(policy, tau if tau is not None else std, b)
        t_c = cand.quantize(cand.level_from_norm(e_clean.to(policy.norm_mean.dtype)))
        t_a = cand.quantize(cand.level_from_norm(e_adv.to(policy.norm_mean.dtype)))
        clean_acc, robust_acc = accuracy(clean_tab, t_c), accuracy(adv_tab, t_a)
        table.append(
            {
                "tau": tau,
                "tau_std_multiple": None if tau is None else tau / std if std > 0 else None,
                "bias": b,
                "clean_acc": clean_acc,
                "robust_acc": robust_acc,
                "mean_t_clean": float(t_c.double().mean()),
                "mean_t_adv": float(t_a.double().mean()),
                "feasible": robust_acc >= floor - 1e-12,
                "score": weight * clean_acc + (1 - weight) * robust_acc,
            }
        )
    if objective == "weighted":
        best = max(table, key=lambda r: (r["score"], r["robust_acc"], r["clean_acc"]))
    else:
        feasible = [r for r in table if r["feasible"]]
        if feasible:
            best = max(feasible, key=lambda r: (r["clean_acc"], r["robust_acc"], -r["bias"]))
        else:
            log.warning(
                "no (tau, bias) reaches robust accuracy %.3f; choosing the most robust pair", floor
            )
            best = max(table, key=lambda r: (r["robust_acc"], r["clean_acc"]))
    policy.tau = best["tau"]
    policy.bias = best["bias"]
    return CalibrationResult(
        policy=POLICY_NAME[policy.reweight],
        t_star=policy.t_star,
        objective=objective,
        min_robust=floor,
        weight=weight,
        statistics=policy.statistics(),
        baseline=baseline,
        chosen=dict(best),
        table=table,
        t_grid=grid.tolist(),
        n_stats=int(n_stats),
        n_calibration=int(clean_tab.shape[0]),
    )
