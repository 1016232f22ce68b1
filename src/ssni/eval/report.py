"""The result of an evaluation: :class:`Report` (accuracies over seeds, per-sample records)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from torch import Tensor

__all__ = ["Report", "build_report", "floats"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Report:
    """Result of :func:`evaluate`; a plain dataclass (``to_dict`` / ``to_json``).

    Accuracies are fractions in [0, 1], mean and sample std over seeds. ``robust_accuracy``
    counts a sample robust only if its clean and its adversarial input are both classified right
    (a clean-misclassified sample is never robust); ``robust_accuracy_reference`` is the SSNI
    reference code's metric, the adversarial input classified right on its own (so it can exceed
    ``robust_accuracy`` by the samples that are wrong clean but right after the attack). ``records``
    holds one
    dict per (seed, sample) with keys ``seed, index, label, clean_pred, adv_pred, clean_passes,
    adv_passes, clean_correct, robust, robust_worst, t_clean, t_adv, score_norm_clean,
    score_norm_adv, perturbation, grad_iterations, attack_network_evals, zero_grad,
    nonfinite_grad, outside_threat`` (``t_*`` / ``score_norm_*`` are None when the policy has no
    such quantity; ``attack_network_evals`` is the score-network evaluations per image that the
    attack spent, averaged over its chunk, probes and checkpoint recomputations included).
    ``network_evals_per_iteration`` is their mean per gradient estimate (None for logs written
    before it was recorded).
    """

    clean_accuracy: float
    clean_accuracy_std: float
    robust_accuracy: float
    robust_accuracy_std: float
    robust_accuracy_worst: float
    robust_accuracy_worst_std: float
    n_samples: int
    seeds: List[int]
    votes: int
    worst_of: int
    per_seed: List[Dict[str, Any]]
    records: List[Dict[str, Any]]
    warnings: List[str]
    undefended: Optional[Dict[str, Any]]
    config: Dict[str, Any]
    network_evals_per_iteration: Optional[float] = None
    robust_accuracy_reference: float = float("nan")
    robust_accuracy_reference_std: float = float("nan")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: Optional[Union[str, os.PathLike]] = None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent, sort_keys=True)
        if path is not None:
            from ..io.files import write_text_atomic

            write_text_atomic(path, text + "\n")
        return text

    def values(self, key: str, seed: Optional[int] = None) -> List[Any]:
        """One record field over all records (of one ``seed`` if given), in record order."""
        return [r[key] for r in self.records if seed is None or r["seed"] == seed]

    @property
    def score_norm_clean(self) -> List[Optional[float]]:
        return self.values("score_norm_clean")

    @property
    def score_norm_adv(self) -> List[Optional[float]]:
        return self.values("score_norm_adv")

    @property
    def t_clean(self) -> List[Optional[float]]:
        return self.values("t_clean")

    @property
    def t_adv(self) -> List[Optional[float]]:
        return self.values("t_adv")

    def summary(self) -> str:
        """Human-readable summary with the warnings."""
        pct = 100.0
        lines = [
            f"samples: {self.n_samples}, seeds: {self.seeds}, votes: {self.votes}, "
            f"worst-of: {self.worst_of}",
            f"clean accuracy:  {pct * self.clean_accuracy:.2f} +- "
            f"{pct * self.clean_accuracy_std:.2f} %",
            f"robust accuracy: {pct * self.robust_accuracy:.2f} +- "
            f"{pct * self.robust_accuracy_std:.2f} % (majority of {self.votes})",
            f"robust accuracy: {pct * self.robust_accuracy_worst:.2f} +- "
            f"{pct * self.robust_accuracy_worst_std:.2f} % (worst of {self.worst_of})",
            f"robust accuracy: {pct * self.robust_accuracy_reference:.2f} +- "
            f"{pct * self.robust_accuracy_reference_std:.2f} % (reference's metric: adversarial "
            "input right on its own, clean errors included)",
        ]
        if self.network_evals_per_iteration is not None:
            lines.append(
                "attack cost: "
                f"{self.network_evals_per_iteration:.1f} network evaluations per image per "
                "iteration"
            )
        if self.undefended is not None:
            lines.append(
                "undefended classifier under the same attack: "
                f"{pct * self.undefended['robust_accuracy']:.2f} % robust "
                f"({self.undefended['samples']} samples)"
            )
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def floats(v: Optional[Tensor]) -> List[Optional[float]]:
    if v is None:
        return None
    return [float(a) for a in v.detach().cpu().double().tolist()]


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def build_report(records, seeds, n, votes, worst_of, config, attack, undefended, stochastic,
            sanity_checks, threshold) -> Report:
    per_seed = []
    for s in seeds:
        rs = [r for r in records if r["seed"] == s]
        per_seed.append(
            {
                "seed": s,
                "clean_accuracy": sum(r["clean_correct"] for r in rs) / n,
                "robust_accuracy": sum(r["robust"] for r in rs) / n,
                "robust_accuracy_worst": sum(r["robust_worst"] for r in rs) / n,
                "robust_accuracy_reference": sum(r["adv_pred"] == r["label"] for r in rs) / n,
            }
        )
    warnings: List[str] = []
    if sanity_checks:
        if stochastic and attack.passes == 1:
            warnings.append(
                "the defense is stochastic but the attack uses one pass per gradient (EOT = 1); "
                "use EOT (e.g. 20 passes) or the robust accuracy is overestimated"
            )
        zero_all = sum(1 for r in records if r["grad_iterations"] and
                       r["zero_grad"] >= r["grad_iterations"])
        if zero_all:
            warnings.append(
                f"{zero_all} of {len(records)} attacked samples had an all-zero input gradient "
                "at every iteration (gradient masking or a detached graph)"
            )
        nonfinite = sum(r["nonfinite_grad"] for r in records)
        if nonfinite:
            warnings.append(
                f"{nonfinite} gradient estimates had NaN or infinite entries (set to zero)"
            )
        outside = sum(r["outside_threat"] for r in records)
        if outside:
            warnings.append(
                f"the attack returned {outside} points outside the threat model (projected)"
            )
        if undefended is not None and undefended["robust_accuracy"] > threshold:
            warnings.append(
                f"the attack leaves the undefended classifier "
                f"{100 * undefended['robust_accuracy']:.1f} % robust at the same budget "
                f"(> {100 * threshold:.0f} %): the attack is probably broken or too weak"
            )
    for w in warnings:
        logger.warning(w)
    clean = [p["clean_accuracy"] for p in per_seed]
    rob = [p["robust_accuracy"] for p in per_seed]
    worst = [p["robust_accuracy_worst"] for p in per_seed]
    per_iter = [
        r["attack_network_evals"] / r["grad_iterations"]
        for r in records
        if r.get("attack_network_evals") is not None and r.get("grad_iterations")
    ]
    ref = [p["robust_accuracy_reference"] for p in per_seed]
    return Report(
        clean_accuracy=float(np.mean(clean)),
        clean_accuracy_std=_std(clean),
        robust_accuracy=float(np.mean(rob)),
        robust_accuracy_std=_std(rob),
        robust_accuracy_worst=float(np.mean(worst)),
        robust_accuracy_worst_std=_std(worst),
        n_samples=n,
        seeds=list(seeds),
        votes=int(votes),
        worst_of=int(worst_of),
        per_seed=per_seed,
        records=records,
        warnings=warnings,
        undefended=undefended,
        config=config,
        network_evals_per_iteration=float(np.mean(per_iter)) if per_iter else None,
        robust_accuracy_reference=float(np.mean(ref)),
        robust_accuracy_reference_std=_std(ref),
    )
