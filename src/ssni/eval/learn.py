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

**Floor** ``t_min`` (the lowest level the policy may return). Targets are "the smallest level
that classifies correctly", so clean images that the classifier gets right unpurified, and
adversarial ones from a weak transfer attack that it also gets right, ask for ``t = 0``: no
purification at all. Against an attacker who adapts to the policy that is the weakest point: an
input that looks clean to the policy is classified by the bare classifier. The transfer data
cannot show this (its adversarial images were aimed at ``t*``, not at the low levels), so with
``floors`` the selection also measures each candidate floor ``f`` against an attack aimed at it:
:attr:`PolicyData.floor_correct` holds, per validation image, whether the constant-``f``
defense classifies correctly an adversarial version crafted against that same defense
(``ssni train-policy`` crafts them). A candidate ``(f, w)`` then counts an image as robust only if
it survives both the transfer attack at its policy level and the attack aimed at the floor (the
worst case of the two, per image: what an attacker who can steer the input to the floor leaves),
and the objective above chooses ``f`` and ``w`` together (ties: the larger floor, then the larger
``w``). With ``b = 0`` the candidate floor ``t*`` is the constant-``t*`` defense itself (``ssni
train-policy`` takes its measurement from the table's ``t*`` column, so its worst case is the
baseline): the constrained objective then always has a feasible candidate and never chooses a
floor whose measured worst case is below the constant defense's robust accuracy. Targets below
the floor are raised to it.
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
    "floor_candidates",
    "floor_correctness",
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
    ``targets`` ``(N,)`` (NaN: left out; targets below the policy's floor are raised to it);
    ``adversarial`` ``(N,)`` booleans mark the inputs whose under-noising costs ``under_weight``.
    The feature statistics must already be set. Returns the loss every 100 steps (none when the
    floor is the ceiling: the level is then constant and there is nothing to fit)."""
    if not under_weight > 0:
        raise ValueError(f"under_weight must be > 0, got {under_weight}")
    keep = torch.isfinite(targets)
    if int(keep.sum()) < 2:
        raise ValueError("fit_policy needs at least two samples with a finite target")
    dtype = policy.feature_mean.dtype
    lo, hi = policy.min_level, policy.max_level
    f = features[keep].to(dtype)
    # in units of t* + b; level = lo + (hi - lo) sigmoid (exactly the old loss when lo = 0)
    tgt = (targets[keep].to(dtype).clamp_min(lo) - lo) / hi
    scale = (hi - lo) / hi
    adv = adversarial[keep].bool()
    _reset(policy, seed)
    if scale <= 0:
        return []
    params = [policy.e_weight, policy.offset, *policy.rest.parameters()]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    losses = []
    with torch.enable_grad():
        for step in range(steps):
            opt.zero_grad()
            d = scale * torch.sigmoid(policy.logit(f)) - tgt
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
    (CPU tensors; ``grid`` the table's levels, column 0 may be level 0 = no purification).

    ``floor_levels`` ``(F,)`` and ``floor_correct`` ``(N, F)`` (optional, for choosing the floor):
    whether the constant defense at each level classifies correctly an adversarial version of
    the image crafted against that same constant defense (:func:`floor_correctness`)."""

    grid: Tensor
    features_clean: Tensor
    features_adv: Tensor
    e_clean: Tensor
    e_adv: Tensor
    table_clean: Tensor
    table_adv: Tensor
    floor_levels: Optional[Tensor] = None
    floor_correct: Optional[Tensor] = None

    def floor_column(self, level: float) -> Optional[Tensor]:
        """``(N,)`` booleans of :attr:`floor_correct` at ``level`` (None if not measured)."""
        if self.floor_levels is None or self.floor_correct is None:
            return None
        hit = (self.floor_levels.double() - float(level)).abs() < 1e-9
        if not bool(hit.any()):
            return None
        return self.floor_correct[:, int(hit.nonzero()[0, 0])].bool()

    def with_floors(self, levels: Tensor, correct: Tensor) -> PolicyData:
        """A copy with the floor measurements ``levels`` ``(F,)`` / ``correct`` ``(N, F)``
        merged in (new levels replace old ones)."""
        old_l = [] if self.floor_levels is None else self.floor_levels.double().tolist()
        cols = {round(v, 9): self.floor_correct[:, i].bool() for i, v in enumerate(old_l)}
        for i, v in enumerate(torch.as_tensor(levels, dtype=torch.float64).tolist()):
            cols[round(v, 9)] = torch.as_tensor(correct)[:, i].bool().cpu()
        keys = sorted(cols)
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        fields["floor_levels"] = torch.tensor(keys, dtype=torch.float64)
        fields["floor_correct"] = torch.stack([cols[k] for k in keys], dim=1)
        return PolicyData(**fields)

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


def floor_candidates(data: PolicyData, policy: LearnedPolicy) -> List[float]:
    """The grid levels that can serve as the floor: those in ``[0, t* + b]``."""
    return [float(v) for v in data.grid.tolist() if v <= policy.max_level + 1e-12]


@torch.no_grad()
def floor_correctness(
    classifier: nn.Module,
    purifier: Purifier,
    x_adv: Tensor,
    y: Tensor,
    level: float,
    *,
    batch_size: int = 64,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """``(N,)`` booleans: the constant-``level`` defense (one draw; level 0: the classifier
    alone) is right on ``x_adv`` (crafted by the caller against that same defense)."""
    grid = torch.tensor([float(level)], dtype=torch.float64)
    tab = correctness_table(purifier, classifier, x_adv, y, grid, votes=1, batch_size=batch_size,
                            generator=generator, progress=None)
    return tab[:, 0].cpu()


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
    t_min: float = 0.0
    floors: List[float] = field(default_factory=list)
    floor_selected: bool = False
    statistics: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _accuracy(
    policy: LearnedPolicy, data: PolicyData, idx: Tensor, floor: Optional[Tensor] = None
) -> Dict[str, float]:
    """Accuracies read off the tables; with ``floor`` ``(N,)`` (the floor's own correctness
    under an attack aimed at it) ``robust_acc`` is the per-image worst case of the transfer
    attack and that one (``robust_transfer`` and ``robust_floor`` give both)."""
    with torch.no_grad():
        t_c = policy.quantize(policy.level_from_features(data.features_clean[idx]))
        t_a = policy.quantize(policy.level_from_features(data.features_adv[idx]))
    c = data.table_clean[idx, snap(t_c, data.grid)]
    a = data.table_adv[idx, snap(t_a, data.grid)]
    out = {
        "clean_acc": float(c.double().mean()),
        "robust_acc": float((a & c).double().mean()),
        "mean_t_clean": float(t_c.double().mean()),
        "mean_t_adv": float(t_a.double().mean()),
        "at_floor_clean": float((t_c <= policy.min_level + 1e-9).double().mean()),
    }
    if floor is not None:
        f = floor[idx].bool()
        out["robust_transfer"] = out["robust_acc"]
        out["robust_floor"] = float((f & c).double().mean())
        out["robust_acc"] = float((a & c & f).double().mean())
    return out


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
    floors: Optional[Sequence[float]] = None,
) -> TrainingResult:
    """Choose the under-noising weight (and the floor) on held-out validation images and train
    ``policy``.

    Args:
        policy: the :class:`~ssni.LearnedPolicy` to train (its network is overwritten).
        data: from :func:`policy_data` (same ``t*``, ``b`` and probe levels as ``policy``).
        under_weights: candidate weights of an under-noised adversarial input (> 0).
        select_fraction: share of the images (a seeded permutation) that choose the weight.
        objective, min_robust, weight: as in :func:`ssni.eval.calibrate.calibrate`; robust
            accuracy counts an image only when its clean version is right too.
        steps, lr, seed: optimisation of :func:`fit_policy`.
        floors: candidate floors ``t_min`` chosen together with the weight, each measured under
            an attack aimed at it (``data.floor_correct`` must hold every one; see the module
            docstring); None keeps ``policy.t_min`` and measures robustness on the transfer
            data only.

    Returns:
        :class:`TrainingResult`; ``policy`` holds the final network, its floor, the feature
        statistics and the clean EPS-norm statistics of all ``data`` images.
    """
    if objective not in ("constrained", "weighted"):
        raise ValueError(f"objective must be 'constrained' or 'weighted', got {objective!r}")
    if not under_weights:
        raise ValueError("under_weights needs at least one value")
    if not 0.0 < select_fraction < 1.0:
        raise ValueError(f"select_fraction must be in (0, 1), got {select_fraction}")
    select_floor = floors is not None
    if select_floor:
        if not floors:
            raise ValueError("floors needs at least one value (or None: keep policy.t_min)")
        candidates = sorted({float(f) for f in floors})
        for f in candidates:
            if not 0.0 <= f <= policy.max_level + 1e-12:
                raise ValueError(f"floor {f} is outside [0, t* + b = {policy.max_level}]")
            if data.floor_column(f) is None:
                raise ValueError(
                    f"floor {f} has no measurement in data.floor_correct (levels "
                    f"{None if data.floor_levels is None else data.floor_levels.tolist()})"
                )
    else:
        candidates = [policy.t_min]
    n = data.features_clean.shape[0]
    t_c, t_a = data.targets(policy.max_level)
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    n_sel = max(1, min(n - 2, int(round(select_fraction * n))))
    sel, fit = perm[:n_sel].sort().values, perm[n_sel:].sort().values

    def train_on(idx: Tensor, w: float) -> List[float]:
        policy.set_feature_statistics(data.features_clean[idx])
        policy.set_statistics(data.e_clean[idx])
        feats = torch.cat([data.features_clean[idx], data.features_adv[idx]])
        targets = torch.cat([t_c[idx], t_a[idx]])
        adv = torch.cat([torch.zeros(idx.numel(), dtype=torch.bool),
                         torch.ones(idx.numel(), dtype=torch.bool)])
        return fit_policy(policy, feats, targets, adv, under_weight=w, steps=steps, lr=lr,
                          seed=seed)

    def floor_of(f: float) -> Optional[Tensor]:
        return data.floor_column(f) if select_floor else None

    col = snap(torch.tensor([policy.t_star]), data.grid)
    c0 = data.table_clean[sel][:, col].squeeze(1)
    a0 = data.table_adv[sel][:, col].squeeze(1)
    baseline = {
        "clean_acc": float(c0.double().mean()),
        "robust_acc": float((a0 & c0).double().mean()),
        "t": policy.t_star,
    }
    needed = baseline["robust_acc"] if min_robust < 0 else float(min_robust)
    rows = []
    for t_min in candidates:
        policy.t_min = float(t_min)
        for w in under_weights:
            train_on(fit, float(w))
            acc = _accuracy(policy, data, sel, floor_of(t_min))
            rows.append({
                "t_min": float(t_min),
                "under_weight": float(w),
                **acc,
                "feasible": acc["robust_acc"] >= needed - 1e-12,
                "score": weight * acc["clean_acc"] + (1 - weight) * acc["robust_acc"],
            })
    # ties go to the larger floor, then to the larger weight: more noise for inputs that look
    # adversarial
    if objective == "weighted":
        best = max(rows, key=lambda r: (r["score"], r["robust_acc"], r["t_min"],
                                        r["under_weight"]))
    else:
        feasible = [r for r in rows if r["feasible"]]
        pool = feasible or rows
        first, second = ("clean_acc", "robust_acc") if feasible else ("robust_acc", "clean_acc")
        best = max(pool, key=lambda r: (r[first], r[second], r["t_min"], r["under_weight"]))
    everything = torch.arange(n)
    policy.t_min = best["t_min"]
    losses = train_on(everything, best["under_weight"])
    lost_adv = ~data.table_adv.any(1)
    targets = {
        "mean_clean": float(t_c[torch.isfinite(t_c)].mean()) if torch.isfinite(t_c).any() else None,
        "mean_adv": float(t_a.mean()),
        "clean_right_nowhere": float((~torch.isfinite(t_c)).double().mean()),
        "adv_right_nowhere": float(lost_adv.double().mean()),
        "clean_at_zero": float((t_c == 0).double().mean()),
    }
    if select_floor:
        targets["floor_robust"] = {
            f"{f:g}": float(data.floor_column(f).double().mean()) for f in candidates
        }
    return TrainingResult(
        under_weight=best["under_weight"],
        objective=objective,
        min_robust=needed,
        weight=weight,
        n_fit=int(fit.numel()),
        n_select=int(sel.numel()),
        grid=data.grid.tolist(),
        targets=targets,
        baseline=baseline,
        chosen=dict(best),
        table=rows,
        final=_accuracy(policy, data, everything, floor_of(best["t_min"])),
        losses=losses,
        t_min=float(best["t_min"]),
        floors=[float(f) for f in candidates],
        floor_selected=select_floor,
        statistics=policy.statistics(),
    )
