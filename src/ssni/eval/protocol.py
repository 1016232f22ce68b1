"""Robustness evaluation of a (stochastic) purification defense: ``evaluate(...) -> Report``.

Protocol (SSNI paper, after Lee & Kim 2023 and Croce & Hein 2020):

* every sample is attacked with ``attack(gradient_model, x, y)``; the gradient model is the defense
  itself unless a ``surrogate`` is given; success is always judged on the real defense;
* the defense then classifies the clean and the adversarial input ``max(votes, worst_of)`` times;
  the prediction is the majority over ``votes`` passes, and worst-of-N counts a sample robust only
  if all ``worst_of`` passes are right; a clean-misclassified sample is never robust;
* each seed is a full repetition; accuracies are reported as mean and sample std over seeds.

Randomness is derived from ``(seed, chunk start, phase)``, chunks being fixed runs of
``batch_size`` consecutive samples of the data, so results do not depend on how the data were
batched or on restarts (with ``batch_size=1`` every sample's randomness depends on its own index
only), and clean results (predictions, levels, score norms) are the same whatever the attack.
With ``log_path`` every finished sample is appended to a JSONL log and flushed; a restarted
evaluation with the same configuration skips what is done and gives the same report, and a log
written by another configuration is refused.

AutoAttack-style sanity checks are reported as warnings: a stochastic defense attacked without
EOT, all-zero or non-finite input gradients, points outside the threat model, and an attack that
fails to break the undefended classifier at the same budget.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..attacks.base import Attack
from ..attacks.gradients import EOT, forward

__all__ = ["evaluate", "Report", "LOG_FORMAT"]

logger = logging.getLogger(__name__)

LOG_FORMAT = 1
_UNDEFENDED_TAG = 2**31 - 1


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Report:
    """Result of :func:`evaluate`; a plain dataclass (``to_dict`` / ``to_json``).

    Accuracies are fractions in [0, 1], mean and sample std over seeds. ``records`` holds one
    dict per (seed, sample) with keys ``seed, index, label, clean_pred, adv_pred, clean_passes,
    adv_passes, clean_correct, robust, robust_worst, t_clean, t_adv, score_norm_clean,
    score_norm_adv, perturbation, grad_iterations, zero_grad, nonfinite_grad, outside_threat``
    (``t_*`` / ``score_norm_*`` are None when the policy has no such quantity).
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

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: Optional[Union[str, os.PathLike]] = None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent, sort_keys=True)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
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
        ]
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


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def _fingerprint_module(module: Optional[nn.Module]) -> Optional[str]:
    if module is None or not isinstance(module, nn.Module):
        return None
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(value.dtype).encode())
        h.update(str(tuple(value.shape)).encode())
        h.update(_tensor_bytes(value))
    return h.hexdigest()


def _fingerprint_data(x: Tensor, y: Tensor) -> str:
    h = hashlib.sha256()
    for t in (x, y):
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _as_tensors(data) -> Tuple[Tensor, Tensor]:
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], Tensor)
        and isinstance(data[1], Tensor)
        and data[0].dim() == 4
    ):
        x, y = data
    else:
        xs, ys = [], []
        for batch in data:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise ValueError("data must be (x, y) tensors or an iterable of (x, y) batches")
            xs.append(batch[0])
            ys.append(batch[1])
        if not xs:
            raise ValueError("data is empty")
        x, y = torch.cat(xs), torch.cat(ys)
    y = torch.as_tensor(y).long().reshape(-1)
    if x.dim() != 4 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"need images (N, C, H, W) and labels (N,), got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    return x.detach(), y.detach()


def _generator(device: torch.device, *key: int) -> torch.Generator:
    """A generator on ``device`` seeded from the integers ``key`` (independent streams)."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def _device_of(module) -> torch.device:
    if isinstance(module, nn.Module):
        for p in module.parameters():
            return p.device
        for b in module.buffers():
            return b.device
    return torch.device("cpu")


def _majority(preds: Tensor, classes: int) -> Tensor:
    """``preds`` ``(P, B)`` -> ``(B,)`` majority label (ties: smallest)."""
    counts = torch.nn.functional.one_hot(preds, classes).sum(0)
    return counts.argmax(1)


def _passes(model, x: Tensor, n: int, generator) -> Tensor:
    """``(n, B)`` predicted labels of ``n`` stochastic no-grad passes."""
    with torch.no_grad():
        out = []
        for _ in range(n):
            out.append(forward(model, x, generator).argmax(1))
    return torch.stack(out)


def _num_classes(model, x: Tensor, generator) -> int:
    with torch.no_grad():
        return int(forward(model, x[:1], generator).shape[1])


def _probe(defense, x: Tensor, generator):
    """Levels ``t`` and EPS norms ``e`` (or None) of ``x`` under the defense's policy."""
    policy = getattr(defense, "policy", None)
    if policy is None:
        return None, None
    with torch.no_grad():
        if hasattr(policy, "score_norm") and hasattr(policy, "level_from_norm"):
            e = policy.score_norm(x, generator=generator)
            t = policy.quantize(policy.level_from_norm(e))
            return t, e
        return policy(x, generator=generator), None


def _floats(v: Optional[Tensor]) -> List[Optional[float]]:
    if v is None:
        return None
    return [float(a) for a in v.detach().cpu().double().tolist()]


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _jsonable(obj):
    return json.loads(json.dumps(obj, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# log
# ---------------------------------------------------------------------------------------------
class _Log:
    """Append-only JSONL log: a config line, then sample (and undefended-check) lines."""

    def __init__(self, path: Optional[Union[str, os.PathLike]], config: dict) -> None:
        self.path = None if path is None else os.fspath(path)
        self.config = config
        self.samples: Dict[Tuple[int, int], dict] = {}
        self.undefended: Optional[dict] = None
        self._file = None
        if self.path is None:
            return
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            self._load()
        else:
            parent = os.path.dirname(self.path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            self._file = open(self.path, "w")
            self._write({"kind": "config", "format": LOG_FORMAT, "config": config})
        if self._file is None:
            self._file = open(self.path, "a")

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            raw = f.read()
        end = raw.rfind(b"\n") + 1
        if end < len(raw):  # a line cut short by a kill: drop it
            logger.info("dropping an incomplete last line of %s", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(end)
        lines = raw[:end].splitlines()
        if not lines:
            self._file = open(self.path, "w")
            self._write({"kind": "config", "format": LOG_FORMAT, "config": self.config})
            return
        try:
            head = json.loads(lines[0])
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.path} is not an evaluation log") from err
        if head.get("kind") != "config" or head.get("format") != LOG_FORMAT:
            raise ValueError(f"{self.path} is not an evaluation log of format {LOG_FORMAT}")
        if head["config"] != self.config:
            keys = sorted(
                k
                for k in set(head["config"]) | set(self.config)
                if head["config"].get(k) != self.config.get(k)
            )
            raise ValueError(
                f"{self.path} was written by another configuration (differs in {keys}); "
                "use a new log path or delete the old log"
            )
        for i, line in enumerate(lines[1:], start=2):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path}: line {i} is not valid JSON") from err
            if rec.get("kind") == "sample":
                self.samples.setdefault((rec["seed"], rec["index"]), rec["record"])
            elif rec.get("kind") == "undefended":
                self.undefended = rec["result"]

    def _write(self, obj: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(obj, sort_keys=True) + "\n")
        self._file.flush()

    def add_sample(self, record: dict) -> None:
        key = (record["seed"], record["index"])
        if key in self.samples:
            return
        record = _jsonable(record)
        self.samples[key] = record
        self._write({"kind": "sample", "seed": key[0], "index": key[1], "record": record})

    def set_undefended(self, result: dict) -> None:
        self.undefended = _jsonable(result)
        self._write({"kind": "undefended", "result": self.undefended})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------
def _attack_chunk(
    defense, grad_model, attack: Attack, x, y, idx, seed, passes, votes, worst_of, classes
) -> List[dict]:
    # one stream per phase: clean results do not depend on the attack's use of randomness
    gen_clean, gen_attack, gen_adv = (_generator(x.device, seed, int(idx[0]), k) for k in range(3))
    clean = _passes(defense, x, passes, gen_clean)
    t_clean, e_clean = _probe(defense, x, gen_clean)
    x_adv = attack(grad_model, x, y, gen_attack)
    stats = attack.last_stats or {}
    outside = ~attack.threat.contains(x_adv, x)
    if bool(outside.any()):
        x_adv = attack.threat.project(x_adv, x)
    adv = _passes(defense, x_adv, passes, gen_adv)
    t_adv, e_adv = _probe(defense, x_adv, gen_adv)
    clean_pred = _majority(clean[:votes], classes)
    adv_pred = _majority(adv[:votes], classes)
    clean_ok = clean_pred == y
    robust = clean_ok & (adv_pred == y)
    robust_worst = clean_ok & (adv[:worst_of] == y).all(0)
    dist = attack.threat.distance(x_adv, x)
    cols = {
        "t_clean": _floats(t_clean),
        "t_adv": _floats(t_adv),
        "score_norm_clean": _floats(e_clean),
        "score_norm_adv": _floats(e_adv),
    }
    n_iter = int(stats.get("iterations", 0))
    out = []
    for j in range(x.shape[0]):
        rec = {
            "seed": int(seed),
            "index": int(idx[j]),
            "label": int(y[j]),
            "clean_pred": int(clean_pred[j]),
            "adv_pred": int(adv_pred[j]),
            "clean_passes": [int(v) for v in clean[:, j].tolist()],
            "adv_passes": [int(v) for v in adv[:, j].tolist()],
            "clean_correct": bool(clean_ok[j]),
            "robust": bool(robust[j]),
            "robust_worst": bool(robust_worst[j]),
            "perturbation": float(dist[j]),
            "outside_threat": bool(outside[j]),
            "grad_iterations": n_iter,
            "zero_grad": int(stats["zero_grad"][j]) if "zero_grad" in stats else 0,
            "nonfinite_grad": int(stats["nonfinite_grad"][j]) if "nonfinite_grad" in stats else 0,
        }
        for key, col in cols.items():
            rec[key] = None if col is None else col[j]
        out.append(rec)
    return out


def _undefended_check(defense, attack, x, y, seed, batch_size) -> dict:
    classifier = getattr(defense, "classifier", None)
    if classifier is None:
        return None
    plain = attack.with_gradient(EOT(1))
    clean_ok = robust = 0
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        gen = _generator(x.device, seed, _UNDEFENDED_TAG, start)
        with torch.no_grad():
            ok = classifier(xb).argmax(1) == yb
        xa = plain(classifier, xb, yb, gen)
        with torch.no_grad():
            ok_adv = classifier(xa).argmax(1) == yb
        clean_ok += int(ok.sum())
        robust += int((ok & ok_adv).sum())
    n = x.shape[0]
    return {"samples": n, "clean_accuracy": clean_ok / n, "robust_accuracy": robust / n}


def _is_stochastic(defense, x: Tensor) -> bool:
    with torch.no_grad():
        a = forward(defense, x, _generator(x.device, 0, 1))
        b = forward(defense, x, _generator(x.device, 0, 2))
    return not torch.equal(a, b)


def evaluate(
    defense: nn.Module,
    attack: Attack,
    data: Union[Tuple[Tensor, Tensor], Iterable],
    *,
    seeds: Sequence[int] = (121, 122, 123),
    votes: int = 1,
    worst_of: int = 1,
    batch_size: int = 32,
    surrogate: Optional[nn.Module] = None,
    log_path: Optional[Union[str, os.PathLike]] = None,
    progress: bool = False,
    sanity_checks: bool = True,
    sanity_samples: int = 64,
    undefended_threshold: float = 0.1,
) -> Report:
    """Attack ``defense`` on ``data`` and report clean and robust accuracy.

    Args:
        defense: the defense judged (e.g. :class:`ssni.Defense`; any module mapping images in
            [0, 1] to logits works, with ``generator=`` passed if its ``forward`` takes one).
        attack: e.g. ``PGD(ThreatModel("Linf", 8 / 255))``; called as
            ``attack(surrogate or defense, x, y, generator)``.
        data: ``(x, y)`` tensors (images ``(N, C, H, W)`` in [0, 1], labels ``(N,)``) or an
            iterable of such batches.
        seeds: one full repetition per seed (paper: 121, 122, 123).
        votes: stochastic passes whose majority is the prediction.
        worst_of: N of worst-of-N (robust only if all N passes on the adversarial input are
            right).
        batch_size: samples per chunk; part of the configuration (it fixes the randomness).
        surrogate: model whose gradients the attack follows (e.g. the defense with fewer reverse
            steps, or ``bpda(defense)``); success is still judged on ``defense``.
        log_path: JSONL log for resuming; refused if written by another configuration.
        progress: show a tqdm progress bar.
        sanity_checks: run the AutoAttack-style checks (warnings in the report).
        sanity_samples: samples used to attack the undefended classifier.
        undefended_threshold: warn if the undefended classifier keeps more robust accuracy.

    Returns:
        :class:`Report`.
    """
    if votes < 1 or worst_of < 1 or batch_size < 1:
        raise ValueError("votes, worst_of and batch_size must be >= 1")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and non-empty, got {seeds}")
    x, y = _as_tensors(data)
    device = _device_of(defense)
    x, y = x.to(device), y.to(device)
    n = x.shape[0]
    passes = max(votes, worst_of)
    grad_model = surrogate if surrogate is not None else defense
    sanity_n = min(int(sanity_samples), n) if sanity_checks else 0
    config = _jsonable(
        {
            "defense": repr(defense),
            "defense_state": _fingerprint_module(defense),
            "surrogate": None if surrogate is None else repr(surrogate),
            "surrogate_state": _fingerprint_module(surrogate),
            "attack": attack.config(),
            "data": {"n": n, "shape": list(x.shape[1:]), "sha256": _fingerprint_data(x, y)},
            "seeds": seeds,
            "votes": int(votes),
            "worst_of": int(worst_of),
            "batch_size": int(batch_size),
            "sanity": {
                "enabled": bool(sanity_checks),
                "samples": sanity_n,
                "threshold": float(undefended_threshold),
            },
        }
    )
    modules = [m for m in (defense, surrogate) if isinstance(m, nn.Module)]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    log = _Log(log_path, config)
    try:
        classes = _num_classes(defense, x, _generator(x.device, 0, 0))
        chunks = [(s, start) for s in seeds for start in range(0, n, batch_size)]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(seeds) * n, desc="evaluate", unit="sample")
            bar.update(sum(1 for k in log.samples if k[0] in seeds))
        for seed, start in chunks:
            idx = list(range(start, min(start + batch_size, n)))
            if all((seed, i) in log.samples for i in idx):
                continue
            records = _attack_chunk(
                defense, grad_model, attack, x[idx[0] : idx[-1] + 1], y[idx[0] : idx[-1] + 1],
                idx, seed, passes, votes, worst_of, classes,
            )
            for rec in records:
                if (seed, rec["index"]) not in log.samples:
                    log.add_sample(rec)
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        undefended = None
        if sanity_checks and sanity_n > 0:
            undefended = log.undefended
            if undefended is None:
                undefended = _undefended_check(
                    defense, attack, x[:sanity_n], y[:sanity_n], seeds[0], batch_size
                )
                if undefended is not None:
                    log.set_undefended(undefended)
        stochastic = sanity_checks and _is_stochastic(defense, x[: min(4, n)])
    finally:
        log.close()
        for m, flag in zip(modules, was_training):
            m.train(flag)
    records = [log.samples[(s, i)] for s in seeds for i in range(n)]
    return _report(records, seeds, n, votes, worst_of, config, attack, undefended,
                   stochastic, sanity_checks, undefended_threshold)


def _report(records, seeds, n, votes, worst_of, config, attack, undefended, stochastic,
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
    )


