"""Evaluation protocols for a random defense and the worst case over several attacks.

Protocols (every report names the one it uses):

* ``one-shot``: the attack optimises, then the final example is classified once (majority of
  ``votes`` passes) -- AutoAttack's protocol and the SSNI paper's;
* ``worst-of-N``: the final example is robust only if all ``N`` purifications classify it right
  (AutoAttack PRs #104/#105: one evaluation inflates the robustness of a random defense);
* ``any-iteration``: the attack succeeds if the defense misclassified any of its queries or the
  final example (DiffBreak's "evaluating while optimizing"). Repeated queries alone drive a random
  defense towards 0 %, so it is reported with its control, :func:`clean_query_control`: the
  accuracy on clean inputs queried the same number of times.

:func:`worst_of` is AutoAttack's worst case: a sample is robust only if it survives every attack.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..attacks.gradients import forward
from .streams import keyed_generator

__all__ = [
    "PROTOCOLS",
    "robust_flags",
    "protocol_accuracy",
    "worst_of",
    "clean_query_control",
    "CONTROL_TAG",
]

PROTOCOLS = ("one-shot", "worst-of-N", "any-iteration")
CONTROL_TAG = 2**31 - 2  # random-stream key of the clean-query control


def robust_flags(record: Mapping, protocol: str) -> Optional[bool]:
    """Whether one evaluation record counts as robust under ``protocol`` (None: the record
    lacks what the protocol needs, e.g. an attack run without query tracking)."""
    if protocol == "one-shot":
        return bool(record["robust"])
    if protocol == "worst-of-N":
        return bool(record["robust_worst"])
    if protocol == "any-iteration":
        if "fooled_any" not in record:
            return None
        return bool(record["robust"]) and not record["fooled_any"]
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")


def _by_seed(records: Sequence[Mapping]) -> Dict[int, Dict[int, Mapping]]:
    out: Dict[int, Dict[int, Mapping]] = {}
    for r in records:
        out.setdefault(int(r["seed"]), {})[int(r["index"])] = r
    return out


def _mean_std(values: List[float]) -> Dict[str, float]:
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "per_seed": list(values)}


def protocol_accuracy(records: Sequence[Mapping], protocol: str) -> Optional[Dict[str, float]]:
    """Robust accuracy under ``protocol``: ``{"mean", "std", "per_seed"}`` over seeds (fractions),
    or None if some record lacks what the protocol needs."""
    per_seed = []
    for _, recs in sorted(_by_seed(records).items()):
        flags = [robust_flags(r, protocol) for r in recs.values()]
        if any(f is None for f in flags):
            return None
        per_seed.append(sum(flags) / len(flags))
    return _mean_std(per_seed)


def worst_of(members: Mapping[str, Sequence[Mapping]],
             protocols: Sequence[str] = PROTOCOLS) -> Dict[str, Optional[Dict[str, float]]]:
    """AutoAttack-style worst case of several attacks on the same samples and seeds.

    ``members`` maps an attack name to its evaluation records (``Report.records``); a sample is
    robust only if it is robust under every member. Returns ``{protocol: {"mean", "std",
    "per_seed"}}`` (None for a protocol that some member cannot score). Refuses members that
    cover different (seed, sample) pairs.
    """
    if not members:
        raise ValueError("worst_of needs at least one attack")
    tables = {name: _by_seed(recs) for name, recs in members.items()}
    keys = {name: {(s, i) for s, d in t.items() for i in d} for name, t in tables.items()}
    first = next(iter(keys.values()))
    for name, k in keys.items():
        if k != first:
            raise ValueError(f"attack {name!r} covers other (seed, sample) pairs than the rest")
    out: Dict[str, Optional[Dict[str, float]]] = {}
    seeds = sorted({s for s, _ in first})
    for protocol in protocols:
        per_seed, missing = [], False
        for s in seeds:
            idx = sorted(i for ss, i in first if ss == s)
            robust = 0
            for i in idx:
                flags = [robust_flags(t[s][i], protocol) for t in tables.values()]
                if any(f is None for f in flags):
                    missing = True
                    break
                robust += all(flags)
            if missing:
                break
            per_seed.append(robust / len(idx))
        out[protocol] = None if missing else _mean_std(per_seed)
    return out


@torch.no_grad()
def clean_query_control(
    defense, x: Tensor, y: Tensor, queries: int, *, seeds: Sequence[int] = (121, 122, 123),
    batch_size: int = 64,
) -> Dict[str, float]:
    """Control of the any-iteration protocol: the fraction of clean images that ``defense``
    classifies right in every one of ``queries`` independent passes (no attack), mean/std over
    ``seeds``. Returns ``{"mean", "std", "per_seed", "queries", "flags"}``, ``flags`` one list of
    per-image booleans (right in every query) per seed."""
    if queries < 1:
        raise ValueError(f"queries must be >= 1, got {queries}")
    per_seed, flags = [], []
    for seed in seeds:
        right = 0
        seed_flags: List[bool] = []
        for start in range(0, x.shape[0], batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            gen = keyed_generator(xb.device, int(seed), CONTROL_TAG, start)
            ok = torch.ones(xb.shape[0], dtype=torch.bool, device=xb.device)
            for _ in range(queries):
                ok &= forward(defense, xb, gen).argmax(1) == yb
            right += int(ok.sum())
            seed_flags += [bool(v) for v in ok.tolist()]
        per_seed.append(right / x.shape[0])
        flags.append(seed_flags)
    out = _mean_std(per_seed)
    out["queries"] = int(queries)
    out["flags"] = flags
    return out
