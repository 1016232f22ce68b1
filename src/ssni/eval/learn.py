"""Training the learned noise-level policy (:class:`ssni.LearnedPolicy`) on validation data.

An extension beyond the SSNI paper (Sun et al., ICML 2025). Data (``ssni train-policy``):
validation images, clean and adversarial (crafted by the caller against the constant-``t*``
defense), each purified at every level of a grid (the correctness table of ``ssni calibrate``:
level 0 is the classifier alone). The *target* of an image is the smallest grid level at which
its purification is classified correctly (majority of ``votes`` draws); adversarial images that
no level recovers get ``t* + b``; clean images that no level recovers carry no information and
are left out of the loss.

Loss: squared error of ``t(x)`` against the target, in units of ``t* + b``, with weight ``w``
when an adversarial input is under-noised (``t < target``) and 1 otherwise. ``w`` is chosen on a
held-out part of the same validation images: for each candidate, the policy is trained on the
rest, its levels are snapped to the grid and clean/robust accuracy read off the table (no
further network calls); the choice maximises clean accuracy with robust accuracy at least the
constant-``t*`` defense's on those images (``objective="constrained"``) or
``weight * clean + (1 - weight) * robust``; ties go to the larger ``w``. The chosen ``w`` is then
retrained on all images.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..core.learned import LearnedPolicy
from ..core.purifiers import Purifier
from .calibrate import correctness_table, level_grid, snap

__all__ = [
    "optimal_levels",
    "policy_features",
    "fit_policy",
    "PolicyData",
    "policy_data",
    "TrainingResult",
    "train_policy",
]

Progress = Optional[Callable[[int], None]]


def optimal_levels(
    correct: Tensor, grid: Tensor, fallback: Optional[float]
) -> Tuple[Tensor, Tensor]:
    """Smallest grid level at which each sample is right.

    Args:
        correct: ``(N, T)`` booleans over ``grid`` (increasing ``(T,)`` levels).
        fallback: level of samples right nowhere (None: NaN).

    Returns:
        ``(targets, recovered)``: ``(N,)`` float64 levels and ``(N,)`` booleans (right somewhere).
    """
    c = torch.as_tensor(correct, dtype=torch.bool).cpu()
    g = torch.as_tensor(grid, dtype=torch.float64).cpu()
    if c.ndim != 2 or c.shape[1] != g.numel():
        raise ValueError(f"correct must be (N, {g.numel()}), got {tuple(c.shape)}")
    recovered = c.any(1)
    first = c.int().argmax(1)  # first True (0 where none)
    targets = g[first].clone()
    targets[~recovered] = float("nan") if fallback is None else float(fallback)
    return targets, recovered


@torch.no_grad()
def policy_features(
    policy: LearnedPolicy,
    x: Tensor,
    *,
    batch_size: int = 64,
    generator: Optional[torch.Generator] = None,
    progress: Progress = None,
) -> Tuple[Tensor, Tensor]:
    """``(e, features)`` of images ``x``: ``(N,)`` EPS norms and ``(N, K + 3)`` raw features."""
    es, fs = [], []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        e, f = policy.probe(xb, generator=generator)
        es.append(e.double().cpu())
        fs.append(f.double().cpu())
        if progress is not None:
            progress(xb.shape[0])
    return torch.cat(es), torch.cat(fs)


def _reset(policy: LearnedPolicy, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for m in policy.rest.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
    last = policy.rest[-1] if isinstance(policy.rest, nn.Sequential) else policy.rest
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    with torch.no_grad():
        policy.e_weight.fill_(math.log(math.expm1(1.0)))
        policy.offset.zero_()


def fit_policy(
    policy: LearnedPolicy,
    features: Tensor,
    targets: Tensor,
    adversarial: Tensor,
    *,
    under_weight: float = 4.0,
    steps: int = 1000,
    lr: float = 0.03,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> List[float]:
    """Train ``policy``'s network (full-batch Adam) on raw ``features`` ``(N, K + 3)`` and
    ``targets`` ``(N,)`` (NaN: left out); ``adversarial`` ``(N,)`` booleans mark the inputs whose
    under-noising costs ``under_weight``. The feature statistics must already be set. Returns the
    loss every 100 steps."""
    if not under_weight > 0:
        raise ValueError(f"under_weight must be > 0, got {under_weight}")
    keep = torch.isfinite(targets)
    if int(keep.sum()) < 2:
        raise ValueError("fit_policy needs at least two samples with a finite target")
    dtype = policy.feature_mean.dtype
    f = features[keep].to(dtype)
    tgt = targets[keep].to(dtype) / policy.max_level
    adv = adversarial[keep].bool()
    _reset(policy, seed)
    params = [policy.e_weight, policy.offset, *policy.rest.parameters()]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    losses = []
    with torch.enable_grad():
        for step in range(steps):
            opt.zero_grad()
            d = torch.sigmoid(policy.logit(f)) - tgt
            w = torch.where(adv & (d < 0), float(under_weight), 1.0).to(d.dtype)
            loss = (w * d.square()).mean()
            loss.backward()
            opt.step()
            if step % 100 == 0 or step == steps - 1:
                losses.append(float(loss.detach()))
    return losses


@dataclass
class PolicyData:
    """Training data of the learned policy: probe features, correctness tables and targets
    (CPU tensors; ``grid`` the table's levels, column 0 may be level 0 = no purification)."""

    grid: Tensor
    features_clean: Tensor
    features_adv: Tensor
    e_clean: Tensor
    e_adv: Tensor
    table_clean: Tensor
    table_adv: Tensor

    def targets(self, max_level: float) -> Tuple[Tensor, Tensor]:
        """Targets of the clean and the adversarial images (clean right nowhere: NaN)."""
        t_c, _ = optimal_levels(self.table_clean, self.grid, None)
        t_a, _ = optimal_levels(self.table_adv, self.grid, max_level)
        return t_c, t_a

    def to_dict(self) -> Dict[str, Tensor]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def policy_data(
    policy: LearnedPolicy,
    purifier: Purifier,
    classifier: nn.Module,
    x: Tensor,
    y: Tensor,
    x_adv: Tensor,
    *,
    resolution: float = 0.02,
    votes: int = 1,
    batch_size: int = 64,
    generator: Optional[torch.Generator] = None,
    progress: Progress = None,
) -> PolicyData:
    """Probe features and correctness tables of clean ``x`` and adversarial ``x_adv`` (labels
    ``y``) over :func:`~ssni.eval.calibrate.level_grid` of ``policy``'s ``[0, t* + b]`` with
    spacing ``resolution``. ``progress`` counts ``2 N (1 + levels)`` images."""
    if x_adv.shape != x.shape:
        raise ValueError("x_adv must have the shape of x")
    grid = level_grid(policy.t_star, [policy.max_level - policy.t_star], resolution)
    grid = grid[grid <= policy.max_level + 1e-12]
    kw = dict(batch_size=batch_size, generator=generator, progress=progress)
    e_c, f_c = policy_features(policy, x, **kw)
    e_a, f_a = policy_features(policy, x_adv, **kw)
    tab_kw = dict(votes=votes, **kw)
    tab_c = correctness_table(purifier, classifier, x, y, grid, **tab_kw)
    tab_a = correctness_table(purifier, classifier, x_adv, y, grid, **tab_kw)
    return PolicyData(grid, f_c, f_a, e_c, e_a, tab_c.cpu(), tab_a.cpu())


@dataclass
class TrainingResult:
    """What :func:`train_policy` measured (accuracies read off the correctness tables)."""

    under_weight: float
    objective: str
    min_robust: float
    weight: float
    n_fit: int
    n_select: int
    grid: List[float]
    targets: Dict[str, Any]
    baseline: Dict[str, float]
    chosen: Dict[str, Any]
    table: List[Dict[str, Any]] = field(default_factory=list)
    final: Dict[str, float] = field(default_factory=dict)
    losses: List[float] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _accuracy(policy: LearnedPolicy, data: PolicyData, idx: Tensor) -> Dict[str, float]:
    with torch.no_grad():
        t_c = policy.quantize(policy.level_from_features(data.features_clean[idx]))
        t_a = policy.quantize(policy.level_from_features(data.features_adv[idx]))
    c = data.table_clean[idx, snap(t_c, data.grid)]
    a = data.table_adv[idx, snap(t_a, data.grid)]
    return {
        "clean_acc": float(c.double().mean()),
        "robust_acc": float((a & c).double().mean()),
        "mean_t_clean": float(t_c.double().mean()),
        "mean_t_adv": float(t_a.double().mean()),
    }


def train_policy(
    policy: LearnedPolicy,
    data: PolicyData,
    *,
    under_weights: Sequence[float] = (1.0, 2.0, 4.0, 8.0, 16.0),
    select_fraction: float = 0.5,
    objective: str = "constrained",
    min_robust: float = -1.0,
    weight: float = 0.5,
    steps: int = 1000,
    lr: float = 0.03,
    seed: int = 0,
) -> TrainingResult:
    """Choose the under-noising weight on held-out validation images and train ``policy``.

    Args:
        policy: the :class:`~ssni.LearnedPolicy` to train (its network is overwritten).
        data: from :func:`policy_data` (same ``t*``, ``b`` and probe levels as ``policy``).
        under_weights: candidate weights of an under-noised adversarial input (> 0).
        select_fraction: share of the images (a seeded permutation) that choose the weight.
        objective, min_robust, weight: as in :func:`ssni.eval.calibrate.calibrate`; robust
            accuracy counts an image only when its clean version is right too.
        steps, lr, seed: optimisation of :func:`fit_policy`.

    Returns:
        :class:`TrainingResult`; ``policy`` holds the final network and feature statistics.
    """
    if objective not in ("constrained", "weighted"):
        raise ValueError(f"objective must be 'constrained' or 'weighted', got {objective!r}")
    if not under_weights:
        raise ValueError("under_weights needs at least one value")
    if not 0.0 < select_fraction < 1.0:
        raise ValueError(f"select_fraction must be in (0, 1), got {select_fraction}")
    n = data.features_clean.shape[0]
    t_c, t_a = data.targets(policy.max_level)
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    n_sel = max(1, min(n - 2, int(round(select_fraction * n))))
    sel, fit = perm[:n_sel].sort().values, perm[n_sel:].sort().values

    def train_on(idx: Tensor, w: float) -> List[float]:
        policy.set_feature_statistics(data.features_clean[idx])
        feats = torch.cat([data.features_clean[idx], data.features_adv[idx]])
        targets = torch.cat([t_c[idx], t_a[idx]])
        adv = torch.cat([torch.zeros(idx.numel(), dtype=torch.bool),
                         torch.ones(idx.numel(), dtype=torch.bool)])
        return fit_policy(policy, feats, targets, adv, under_weight=w, steps=steps, lr=lr,
                          seed=seed)

    col = snap(torch.tensor([policy.t_star]), data.grid)
    c0 = data.table_clean[sel][:, col].squeeze(1)
    a0 = data.table_adv[sel][:, col].squeeze(1)
    baseline = {
        "clean_acc": float(c0.double().mean()),
        "robust_acc": float((a0 & c0).double().mean()),
        "t": policy.t_star,
    }
    floor = baseline["robust_acc"] if min_robust < 0 else float(min_robust)
    rows = []
    for w in under_weights:
        train_on(fit, float(w))
        acc = _accuracy(policy, data, sel)
        rows.append({
            "under_weight": float(w),
            **acc,
            "feasible": acc["robust_acc"] >= floor - 1e-12,
            "score": weight * acc["clean_acc"] + (1 - weight) * acc["robust_acc"],
        })
    # ties go to the larger weight: more noise for inputs that look adversarial
    if objective == "weighted":
        best = max(rows, key=lambda r: (r["score"], r["robust_acc"], r["under_weight"]))
    else:
        feasible = [r for r in rows if r["feasible"]]
        pool = feasible or rows
        first, second = ("clean_acc", "robust_acc") if feasible else ("robust_acc", "clean_acc")
        best = max(pool, key=lambda r: (r[first], r[second], r["under_weight"]))
    everything = torch.arange(n)
    losses = train_on(everything, best["under_weight"])
    lost_adv = ~data.table_adv.any(1)
    targets = {
        "mean_clean": float(t_c[torch.isfinite(t_c)].mean()) if torch.isfinite(t_c).any() else None,
        "mean_adv": float(t_a.mean()),
        "clean_right_nowhere": float((~torch.isfinite(t_c)).double().mean()),
        "adv_right_nowhere": float(lost_adv.double().mean()),
        "clean_at_zero": float((t_c == 0).double().mean()),
    }
    return TrainingResult(
        under_weight=best["under_weight"],
        objective=objective,
        min_robust=floor,
        weight=weight,
        n_fit=int(fit.numel()),
        n_select=int(sel.numel()),
        grid=data.grid.tolist(),
        targets=targets,
        baseline=baseline,
        chosen=dict(best),
        table=rows,
        final=_accuracy(policy, data, everything),
        losses=losses,
    )

