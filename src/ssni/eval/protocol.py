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
written by another configuration is refused. With ``group`` (``torch.distributed``) the ranks deal
the chunks left to do among themselves; since a chunk's randomness does not depend on who computes
it, the report equals the single-process one (see :mod:`ssni.eval.distributed`).

AutoAttack-style sanity checks are reported as warnings: a stochastic defense attacked without
EOT, all-zero or non-finite input gradients, points outside the threat model, and an attack that
fails to break the undefended classifier at the same budget.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..attacks.base import Attack
from ..attacks.gradients import forward
from ..attacks.target import AttackTarget
from ..core.defense import majority_vote
from ..core.score import count_network_calls
from ..core.validation import check_images
from .checks import is_stochastic, undefended_check
from .distributed import agree, broadcast, gather, rank_of, share, world_of
from .log import LOG_FORMAT, RunLog, fingerprint_data, fingerprint_module, jsonable
from .report import Report, build_report, floats
from .streams import device_of, keyed_generator

__all__ = ["evaluate", "Report", "LOG_FORMAT"]

logger = logging.getLogger(__name__)




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
    y = torch.as_tensor(y)
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"labels must be integers (e.g. torch.int64), got {y.dtype}")
    y = y.long().reshape(-1)
    if x.dim() != 4 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"need images (N, C, H, W) and labels (N,), got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    check_images(x, "images")
    return x.detach(), y.detach()


def _check_labels(y: Tensor, classes: int) -> None:
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= classes:
        raise ValueError(
            f"labels must lie in [0, {classes - 1}] (the defense has {classes} classes), "
            f"got labels in [{lo}, {hi}]"
        )


def _passes(model, x: Tensor, n: int, generator):
    """``n`` stochastic no-grad passes: ``(n, B)`` predicted labels and the levels ``t`` and EPS
    norms ``e`` ``(n, B)`` each pass used (None when the model does not expose them)."""
    run = getattr(model, "run", None)
    preds, ts, es = [], [], []
    with torch.no_grad():
        for _ in range(n):
            if run is not None:
                out = run(x, generator=generator)
                preds.append(out.logits.argmax(1))
                ts.append(out.t)
                es.append(getattr(out, "score_norm", None))
            else:
                preds.append(forward(model, x, generator).argmax(1))
    t = torch.stack(ts) if ts else None
    e = torch.stack(es) if es and all(v is not None for v in es) else None
    return torch.stack(preds), t, e


def _num_classes(model, x: Tensor, generator) -> int:
    with torch.no_grad():
        return int(forward(model, x[:1], generator).shape[1])


def _attack_models(attack) -> List[nn.Module]:
    """Modules an attack holds itself (a surrogate estimator's model), for call counting."""
    found = []
    for a in getattr(attack, "attacks", None) or [attack]:
        model = getattr(getattr(a, "gradient", None), "model", None)
        if isinstance(model, nn.Module):
            found.append(model)
    return found


def _attack_chunk(
    defense, grad_model, attack: Attack, x, y, idx, seed, passes, votes, worst_of, classes
) -> List[dict]:
    # one stream per phase: clean results do not depend on the attack's use of randomness
    gen_clean, gen_attack, gen_adv = (
        keyed_generator(x.device, seed, int(idx[0]), k) for k in range(3)
    )
    clean, t_clean, e_clean = _passes(defense, x, passes, gen_clean)
    with count_network_calls(grad_model, defense, *_attack_models(attack)) as calls:
        x_adv = attack(grad_model, x, y, gen_attack)
    stats = attack.last_stats or {}
    outside = ~attack.threat.contains(x_adv, x)
    if bool(outside.any()):
        x_adv = attack.threat.project(x_adv, x)
    adv, t_adv, e_adv = _passes(defense, x_adv, passes, gen_adv)
    clean_pred = majority_vote(clean[:votes], classes)
    adv_pred = majority_vote(adv[:votes], classes)
    clean_ok = clean_pred == y
    robust = clean_ok & (adv_pred == y)
    robust_worst = clean_ok & (adv[:worst_of] == y).all(0)
    dist = attack.threat.distance(x_adv, x)
    # the level and score norm of the first pass (the prediction's when votes = 1); every pass's
    # levels too when there are several
    cols = {
        "t_clean": floats(None if t_clean is None else t_clean[0]),
        "t_adv": floats(None if t_adv is None else t_adv[0]),
        "score_norm_clean": floats(None if e_clean is None else e_clean[0]),
        "score_norm_adv": floats(None if e_adv is None else e_adv[0]),
    }
    if passes > 1:
        cols["t_clean_passes"] = None if t_clean is None else t_clean.t().tolist()
        cols["t_adv_passes"] = None if t_adv is None else t_adv.t().tolist()
    n_iter = int(stats.get("iterations", 0))
    # optional per-sample attack statistics (e.g. success at any iteration, lowest e(x))
    extra = {k: v.tolist() for k, v in stats.get("per_sample", {}).items()}
    if "queries" in stats:
        extra["queries"] = [int(stats["queries"])] * x.shape[0]
    if "network_calls" in stats:
        extra["network_calls"] = [dict(stats["network_calls"])] * x.shape[0]
    attack_evals = calls.images / x.shape[0]
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
            "attack_network_evals": attack_evals,
            "zero_grad": int(stats["zero_grad"][j]) if "zero_grad" in stats else 0,
            "nonfinite_grad": int(stats["nonfinite_grad"][j]) if "nonfinite_grad" in stats else 0,
        }
        for key, col in cols.items():
            rec[key] = None if col is None else col[j]
        for key, col in extra.items():
            rec[key] = col[j]
        out.append(rec)
    return out


def evaluate(
    defense: Union[nn.Module, AttackTarget],
    attack: Attack,
    data: Union[Tuple[Tensor, Tensor], Iterable],
    *,
    seeds: Sequence[int] = (121, 122, 123),
    votes: int = 1,
    worst_of: int = 1,
    batch_size: int = 32,
    surrogate: Optional[nn.Module] = None,
    log_path: Optional[Union[str, os.PathLike]] = None,
    resume_from: Sequence[Union[str, os.PathLike]] = (),
    group=None,
    progress: bool = False,
    sanity_checks: bool = True,
    sanity_samples: int = 64,
    undefended_threshold: float = 0.1,
    repair_log: bool = False,
    on_start: Optional[Callable[[], None]] = None,
) -> Report:
    """Attack ``defense`` on ``data`` and report clean and robust accuracy.

    Args:
        defense: the defense judged (e.g. :class:`ssni.Defense`; any module mapping images in
            [0, 1] to logits works, with ``generator=`` passed if its ``forward`` takes one), or
            an :class:`~ssni.attacks.AttackTarget` carrying the judged defense and the model
            whose gradient is taken.
        attack: e.g. ``PGD(ThreatModel("Linf", 8 / 255))``; called as
            ``attack(target.gradient, x, y, generator)``.
        data: ``(x, y)`` tensors (images ``(N, C, H, W)`` in [0, 1], labels ``(N,)``) or an
            iterable of such batches.
        seeds: one full repetition per seed (paper: 121, 122, 123).
        votes: stochastic passes whose majority is the prediction.
        worst_of: N of worst-of-N (robust only if all N passes on the adversarial input are
            right).
        batch_size: samples per chunk; part of the configuration (it fixes the randomness).
        surrogate: model whose gradients the attack follows (e.g. ``bpda(defense)``); success
            is still judged on ``defense``, but an attack that picks among its iterates (APGD)
            picks on the surrogate; hand it a ``Surrogate(...)`` gradient estimator instead to
            pick on the real defense. Same as ``AttackTarget(defense, surrogate)``.
        log_path: JSONL log for resuming; refused if written by another configuration.
        resume_from: other logs of this configuration (e.g. those of the ranks of an earlier
            distributed run) whose finished samples count as done; read only, never repeated.
        group: a ``torch.distributed`` process group with a CPU backend (gloo) whose ranks share
            the evaluation: every rank calls ``evaluate`` with the same arguments except its own
            ``log_path``; the chunks left to do are dealt round robin; each rank returns the same
            report, equal to the single-process one. The undefended check runs on rank 0.
        progress: show a tqdm progress bar.
        sanity_checks: run the AutoAttack-style checks (warnings in the report).
        sanity_samples: samples used to attack the undefended classifier.
        undefended_threshold: warn if the undefended classifier keeps more robust accuracy.
        repair_log: when a line before the end of the log is damaged, keep the log up to the
            last good line and redo the rest (default: refuse with a message saying so).
        on_start: called once the inputs and the log are checked, before the first attack
            (callers write their own files there, so a refused evaluation writes nothing).

    Returns:
        :class:`Report`.
    """
    if votes < 1 or worst_of < 1 or batch_size < 1:
        raise ValueError("votes, worst_of and batch_size must be >= 1")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and non-empty, got {seeds}")
    target = AttackTarget.of(defense, surrogate)
    defense = target.judged
    surrogate = target.gradient if target.distinct else None
    x, y = _as_tensors(data)
    device = device_of(defense)
    x, y = x.to(device), y.to(device)
    n = x.shape[0]
    passes = max(votes, worst_of)
    grad_model = target.gradient
    sanity_n = min(int(sanity_samples), n) if sanity_checks else 0
    config = jsonable(
        {
            "defense": repr(defense),
            "defense_state": fingerprint_module(defense),
            "surrogate": None if surrogate is None else repr(surrogate),
            "surrogate_state": fingerprint_module(surrogate),
            "attack": attack.config(),
            "data": {"n": n, "shape": list(x.shape[1:]), "sha256": fingerprint_data(x, y)},
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
    rank, world = rank_of(group), world_of(group)
    try:
        if group is not None:
            configs = gather(group, json.dumps(config, sort_keys=True))
            for r, other in enumerate(configs):
                if other != configs[0]:
                    keys = sorted(k for k, v in json.loads(other).items() if config.get(k) != v)
                    raise ValueError(f"rank {r} has another configuration than rank 0 (in {keys})")

        def check_and_open() -> Tuple[int, RunLog]:
            # one pass on one image checks that the models take these images, before any write
            classes = _num_classes(defense, x, keyed_generator(x.device, 0, 0))
            _check_labels(y, classes)
            return classes, _open_logs(log_path, resume_from, config, repair_log)

        classes, log = agree(group, check_and_open)
    except BaseException:
        for m, flag in zip(modules, was_training):
            m.train(flag)
        raise
    try:
        agree(group, lambda: on_start() if on_start is not None else None)
        done = set().union(*gather(group, set(log.samples)))  # what any rank's logs hold
        todo = [
            (s, start)
            for s in seeds
            for start in range(0, n, batch_size)
            if not all((s, i) in done for i in range(start, min(start + batch_size, n)))
        ]
        mine = share(todo, rank, world)

        def run_mine() -> None:
            bar = None
            if progress:
                from tqdm.auto import tqdm

                total = sum(min(batch_size, n - start) for _, start in mine)
                bar = tqdm(total=total, desc="evaluate", unit="sample")
            for seed, start in mine:
                idx = list(range(start, min(start + batch_size, n)))
                records = _attack_chunk(
                    defense, grad_model, attack, x[idx[0] : idx[-1] + 1],
                    y[idx[0] : idx[-1] + 1], idx, seed, passes, votes, worst_of, classes,
                )
                for rec in records:
                    log.add_sample(rec)
                if bar is not None:
                    bar.update(len(idx))
            if bar is not None:
                bar.close()

        agree(group, run_mine)
        samples = dict(log.samples)
        undefended = log.undefended
        if group is not None:
            for theirs, their_undefended in gather(group, (log.samples, log.undefended)):
                for key, rec in theirs.items():
                    samples.setdefault(key, rec)
                undefended = undefended or their_undefended

        def checks():
            und = undefended
            if sanity_checks and sanity_n > 0 and und is None:
                und = undefended_check(
                    defense, attack, x[:sanity_n], y[:sanity_n], seeds[0], batch_size
                )
                if und is not None:
                    log.set_undefended(und)
            if not sanity_checks:
                und = None
            return und, sanity_checks and is_stochastic(defense, x[: min(4, n)])

        undefended, stochastic = broadcast(
            group, agree(group, lambda: checks() if rank == 0 else None)
        )
    finally:
        log.close()
        for m, flag in zip(modules, was_training):
            m.train(flag)
    records = [samples[(s, i)] for s in seeds for i in range(n)]
    return build_report(records, seeds, n, votes, worst_of, config, attack, undefended,
                   stochastic, sanity_checks, undefended_threshold)


def _open_logs(log_path, resume_from, config, repair: bool) -> RunLog:
    """This process's log, with the finished samples of the logs ``resume_from`` merged in."""
    log = RunLog(log_path, config, repair=repair)
    try:
        own = None if log_path is None else os.path.abspath(log_path)
        for path in resume_from:
            if own is None or os.path.abspath(path) != own:
                log.merge(path)
    except BaseException:
        log.close()
        raise
    return log
