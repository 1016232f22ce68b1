"""Command ``ssni evaluate``: attack a defense on a fixed subset and write the report files."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple

from ..eval.streams import seeded_generator
from .common import (
    EXAMPLE_PRESET,
    add_config_args,
    emit,
    load_run_config,
    setup_logging,
    show_progress,
    write_config,
)
from .progress import Progress

log = logging.getLogger("ssni.cli")

def _rows(cfg, report) -> List[Dict[str, Any]]:
    from ..eval.reports import roc_auc

    rows = []
    for per in report.per_seed:
        seed = per["seed"]
        recs = [r for r in report.records if r["seed"] == seed]
        metrics: Dict[str, Any] = {
            "clean_acc": per["clean_accuracy"],
            "robust_acc": per["robust_accuracy"],
            # the SSNI reference code's metric: adversarial input right on its own
            "robust_acc_ref": per["robust_accuracy_reference"],
        }
        for key, name in (("t_clean", "mean_t_clean"), ("t_adv", "mean_t_adv")):
            vals = [r[key] for r in recs if r.get(key) is not None]
            if vals:
                metrics[name] = float(sum(vals) / len(vals))
        ec = [r["score_norm_clean"] for r in recs if r.get("score_norm_clean") is not None]
        ea = [r["score_norm_adv"] for r in recs if r.get("score_norm_adv") is not None]
        if ec and ea:
            metrics["auc"] = roc_auc(ec, ea)
        rows.append({"name": cfg.name, "seed": seed, "metrics": metrics, "config": cfg.to_dict()})
    return rows


def _figures(out: Path, cfg, report) -> List[str]:
    from ..eval import reports

    made = []
    ec = [v for v in report.score_norm_clean if v is not None]
    ea = [v for v in report.score_norm_adv if v is not None]
    if ec:
        reports.plot_score_norm_hist(ec, ea, out / "score_norms.png", title=cfg.name)
        made.append("score_norms.png")
    tc = [v for v in report.t_clean if v is not None]
    ta = [v for v in report.t_adv if v is not None]
    if tc:
        levels = {"clean": tc}
        if ta:
            levels["adversarial"] = ta
        reports.plot_t_hist(levels, out / "t_hist.png", t_star=cfg.t_star, title=cfg.name)
        made.append("t_hist.png")
    return made


class RunResult(NamedTuple):
    """What :func:`run_config` produced: the report, its table rows, file names and time."""

    report: Any
    rows: List[Dict[str, Any]]
    files: List[str]
    seconds: float


def run_config(cfg, out: Path, *, progress: bool, attack_setup=None) -> RunResult:
    """Evaluate one configuration into ``out`` (config.toml, log.jsonl, report files, figures).

    ``out`` is locked for the whole run (:class:`~ssni.io.lock.LockError` if another run holds
    it); nothing is written into it before the data, weights, policy file and an existing log
    are checked; a rerun with the same configuration resumes from the logs in ``out``. Under
    ``torchrun`` rank 0 holds the lock, every rank evaluates its share of the chunks into
    ``out/log.rank{r}.jsonl`` and rank 0 alone writes the other files (the other ranks return
    the same report and no files).
    ``attack_setup`` (``(cfg, defense) -> AttackSetup``) replaces :func:`build.build_attack`
    (attacks that the configuration keys do not name, e.g. AutoAttack-rand).
    """
    from ..eval.distributed import agree
    from ..io.lock import folder_lock
    from . import distributed

    job = distributed.job(cfg.device)
    out = Path(out)
    lock = folder_lock(out)
    # one lock for the job, held by rank 0; if rank 0 cannot take it, every rank stops
    agree(job.group, lambda: lock.acquire() if job.rank == 0 else None)
    try:
        return _run_locked(cfg, out, progress, job, attack_setup)
    finally:
        lock.release()


def _run_locked(cfg, out: Path, progress: bool, job, attack_setup=None) -> RunResult:
    from ..eval import reports
    from ..eval.distributed import share_buffers
    from ..eval.protocol import evaluate
    from . import build, distributed

    lead = job.rank == 0
    start = time.perf_counter()
    local = cfg.replace(device=job.device(cfg.device)) if job.distributed else cfg
    fitting = cfg.policy != "constant" and not cfg.policy_file
    # Clean statistics: fitted once on rank 0 and broadcast, so every rank holds the same ones.
    bar = Progress(cfg.stats_n if fitting and lead else 0, "clean score norms", not progress)
    parts = build.build_components(
        local, generator=seeded_generator(cfg.subset_seed), progress=bar,
        fit=lead or not fitting,
    )
    bar.close()
    if fitting:
        share_buffers(job.group, parts.policy)
    x, y = build.eval_images(local)
    setup = (attack_setup or build.build_attack)(local, parts.defense)
    log.info(
        "%s: %d images, %s%s", cfg.name, x.shape[0], setup.description,
        f", {job.world_size} ranks" if job.distributed else "",
    )
    report = evaluate(
        setup.target,
        setup.attack,
        (x.to(local.device), y.to(local.device)),
        seeds=cfg.seeds,
        votes=cfg.votes,
        batch_size=cfg.batch_size,
        log_path=out / distributed.log_name(job),
        resume_from=sorted(out.glob("log*.jsonl")),
        group=job.group,
        progress=progress and lead,
        sanity_samples=min(64, cfg.n),
        repair_log=cfg.resume == "repair",
        on_start=(lambda: write_config(out, cfg)) if lead else None,
    )
    rows = _rows(cfg, report)
    seconds = time.perf_counter() - start
    extra = {
        "attack": setup.description,
        "warnings": list(report.warnings),
        "undefended": report.undefended,
        "evaluation": report.config,
        "seconds": seconds,
        "policy": _policy_info(parts.policy),
        "resolved_config": cfg.to_dict(),
    }
    if not lead:
        return RunResult(report, rows, [], seconds)
    paths = reports.write_report(out, rows, title=cfg.name, extra=extra)
    files = [p.name for p in paths.values()] + _figures(out, cfg, report)
    return RunResult(report, rows, files, seconds)


def cmd_evaluate(args) -> int:
    from ..eval import reports

    setup_logging(args)
    cfg = load_run_config(args)
    out = Path(args.out)
    result = run_config(cfg, out, progress=show_progress(args))
    if not result.files:  # a rank other than 0 of a torchrun job: rank 0 reports
        return 0
    emit((out / reports.REPORT_MD).read_text(encoding="utf-8"))
    emit(
        f"wrote {', '.join(result.files)}, config.toml, {_logs(out)} to {out} "
        f"({result.seconds:.1f} s)"
    )
    return 0


def _logs(out: Path) -> str:
    return ", ".join(p.name for p in sorted(out.glob("log*.jsonl")))


def _policy_info(policy) -> Dict[str, Any]:
    from ..eval.calibrate import policy_state

    try:
        return policy_state(policy)
    except ValueError:
        return {"policy": type(policy).__name__}


def register(subparsers) -> None:
    """Add the commands to ``ssni``'s subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "evaluate",
        help="attack a defense and report clean/robust accuracy",
        description="Attack a purification defense on a fixed subset and write report.json, "
        "report.csv, report.md, figures, the resolved config.toml and a resumable log.jsonl.",
        epilog=f"example: ssni evaluate --preset {EXAMPLE_PRESET} --set n=16 --out runs/a",
        formatter_class=fmt,
    )
    add_config_args(p)
    p.set_defaults(func=cmd_evaluate, torchrun=True)
