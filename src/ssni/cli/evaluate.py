"""Commands ``evaluate``, ``presets``, ``calibrate``, ``analyze-t`` and ``report``.

Every command reads one flat configuration (see :mod:`ssni.cli.config`): a preset (``--preset NAME``
or a path to a ``.toml`` file) plus ``--set key=value`` overrides. Results go to ``--out DIR``
with the resolved configuration beside them (``config.toml``). Exit codes: 0 success, 2 bad
usage or configuration (one-line message naming the key), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple

import torch

from ..errors import UsageError
from .outdir import locks_out

log = logging.getLogger("ssni.cli")

EXAMPLE_PRESET = "fmnist-diffpure-ssni-n-pgd-linf"


# ----------------------------------------------------------------------------- helpers


def _quiet(args) -> bool:
    return bool(getattr(args, "quiet", False) or getattr(args, "sub_quiet", False))


def _setup(args) -> None:
    if getattr(args, "sub_quiet", False):
        logging.getLogger().setLevel(logging.WARNING)


class _Bar:
    """Progress of a long loop: a tqdm bar with ETA on a terminal; otherwise (logs, pipes) an
    INFO line at the start and then at most every ``every`` seconds; nothing with --quiet."""

    def __init__(self, total: int, desc: str, quiet: bool, every: float = 30.0) -> None:
        self.bar = None
        self.total, self.desc, self.every = total, desc, every
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start
        self.lines = not quiet and total > 0 and not sys.stderr.isatty()
        if not quiet and total > 0 and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="img", leave=False)
        elif self.lines:
            log.info("%s: 0/%d", desc, total)

    def __call__(self, k: int) -> None:
        self.done += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.lines and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            spent = self.last - self.start
            left = spent / max(self.done, 1) * max(self.total - self.done, 0)
            log.info("%s: %d/%d (%.0f s, about %.0f s left)", self.desc, self.done, self.total,
                     spent, left)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _show_progress(args) -> bool:
    return not _quiet(args) and sys.stderr.isatty()


def _add_config_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument(
        "--preset",
        metavar="NAME|PATH",
        help="preset name (see `ssni presets`) or path to a TOML file; default: the defaults",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one configuration key (repeatable), e.g. --set n=16 --set eps=8/255",
    )
    p.add_argument("--out", required=out_required, metavar="DIR", help="output directory")
    p.add_argument("--quiet", dest="sub_quiet", action="store_true", help="no progress bars")


def _load(args):
    from . import build
    from .config import load_config

    cfg = load_config(args.preset, args.overrides)
    implied = build.policy_overrides(cfg)
    if implied:
        _refuse_conflicts(cfg, implied, args.overrides)
        cfg = cfg.replace(**implied)
    return cfg


def _refuse_conflicts(cfg, implied: Dict[str, Any], overrides: List[str]) -> None:
    """``--set KEY=`` values that the policy file would silently replace: ConfigError."""
    from .config import ConfigError, parse_override

    explicit = {parse_override(o)[0] for o in overrides}
    for key in sorted(explicit & set(implied)):
        mine, theirs = getattr(cfg, key), implied[key]
        same = mine == theirs or (
            isinstance(mine, float) and abs(mine - float(theirs)) <= 1e-9 * max(1.0, abs(mine))
        )
        if not same:
            raise ConfigError(
                key,
                f"--set {key}={mine!r} conflicts with policy_file {cfg.policy_file} "
                f"({key} = {theirs!r}); drop one of them",
            )


def _write_config(out: Path, cfg) -> None:
    from ..io.files import write_text_atomic
    from .config import to_toml

    write_text_atomic(
        out / "config.toml",
        "# resolved configuration of this run (loadable with --preset)\n" + to_toml(cfg),
    )


def _emit(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def _batches(x, bs):
    return [x[i : i + bs] for i in range(0, x.shape[0], bs)]


def _craft(setup, x, y, cfg, generator, bar) -> torch.Tensor:
    """Adversarial examples for ``x`` in batches (``setup`` from ``build.build_attack``)."""
    if setup is None:
        return x.clone()
    out = []
    for i in range(0, x.shape[0], cfg.batch_size):
        xb, yb = x[i : i + cfg.batch_size], y[i : i + cfg.batch_size]
        out.append(setup.attack(setup.target, xb, yb, generator))
        bar(xb.shape[0])
    return torch.cat(out)


# ----------------------------------------------------------------------------- presets


def cmd_presets(args) -> int:
    from .config import _read_preset, find_preset, list_presets, load_config, to_toml

    if args.keys:
        from .config import RunConfig, key_type

        defaults = RunConfig().to_dict()
        width = max(len(k) for k in defaults)
        _emit("\n".join(f"{k:<{width}}  {key_type(k):<11}  {defaults[k]!r}" for k in defaults))
        return 0
    if args.show:
        find_preset(args.show)
        _emit(to_toml(load_config(args.show)))
        return 0
    presets = list_presets()
    if not presets:
        raise UsageError("no presets found (looked in $SSNI_CONFIG_DIR, ./configs, the package)")
    width = max(len(n) for n in presets)
    lines = []
    for name, entry in presets.items():
        try:
            desc = str(_read_preset(entry).get("description", "")).splitlines()[0:1]
        except UsageError:
            desc = ["(unreadable preset)"]
        lines.append(f"{name:<{width}}  {desc[0] if desc else ''}")
    _emit("\n".join(lines))
    return 0


# ----------------------------------------------------------------------------- evaluate


def _rows(cfg, report) -> List[Dict[str, Any]]:
    from ..eval.reports import roc_auc

    rows = []
    for per in report.per_seed:
        seed = per["seed"]
        recs = [r for r in report.records if r["seed"] == seed]
        metrics: Dict[str, Any] = {
            "clean_acc": per["clean_accuracy"],
            "robust_acc": per["robust_accuracy"],
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
    bar = _Bar(cfg.stats_n if fitting and lead else 0, "clean score norms", not progress)
    parts = build.build_components(
        local, generator=build.seeded_generator(cfg.subset_seed), progress=bar,
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
    surrogate = None if setup.target is parts.defense else setup.target
    report = evaluate(
        parts.defense,
        setup.attack,
        (x.to(local.device), y.to(local.device)),
        seeds=cfg.seeds,
        votes=cfg.votes,
        batch_size=cfg.batch_size,
        surrogate=surrogate,
        log_path=out / distributed.log_name(job),
        resume_from=sorted(out.glob("log*.jsonl")),
        group=job.group,
        progress=progress and lead,
        sanity_samples=min(64, cfg.n),
        repair_log=cfg.resume == "repair",
        on_start=(lambda: _write_config(out, cfg)) if lead else None,
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

    _setup(args)
    cfg = _load(args)
    out = Path(args.out)
    result = run_config(cfg, out, progress=_show_progress(args))
    if not result.files:  # a rank other than 0 of a torchrun job: rank 0 reports
        return 0
    _emit((out / reports.REPORT_MD).read_text(encoding="utf-8"))
    _emit(
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


# ----------------------------------------------------------------------------- calibrate


@locks_out
def cmd_calibrate(args) -> int:
    from ..core.defense import Defense
    from ..core.policies import SSNI, Constant
    from ..eval import reports
    from ..eval.calibrate import calibrate, level_grid, save_policy
    from ..io.files import write_text_atomic
    from . import build
    from .config import ConfigError

    _setup(args)
    cfg = _load(args)
    if cfg.policy not in ("ssni-n", "ssni-l"):
        raise ConfigError("policy", f"calibrate needs ssni-n or ssni-l, got {cfg.policy!r}")
    if cfg.policy_file:
        raise ConfigError("policy_file", "calibrate writes a policy file; unset policy_file")
    out = Path(args.out)
    start = time.perf_counter()
    model = build.build_score_model(cfg)
    classifier = build.build_classifier(cfg)
    purifier = build.build_purifier(cfg, model)
    # Validation data only: statistics and calibration images are disjoint.
    if cfg.stats_split == "val":
        xv, yv = build.load_images(
            cfg, "val", cfg.stats_n + cfg.calib_n, cfg.subset_seed, key="stats_n + calib_n"
        )
        x_stats, x_cal, y_cal = xv[: cfg.stats_n], xv[cfg.stats_n :], yv[cfg.stats_n :]
    else:
        x_stats, _ = build.heldout_images(cfg, cfg.stats_n)
        x_cal, y_cal = build.load_images(cfg, "val", cfg.calib_n, cfg.subset_seed, key="calib_n")
    dev = cfg.device
    x_stats, x_cal, y_cal = x_stats.to(dev), x_cal.to(dev), y_cal.to(dev)
    _write_config(out, cfg)  # inputs checked: the first write
    gen = build.seeded_generator(cfg.seeds[0], dev)
    base = Defense(classifier, purifier, Constant(cfg.t_star))
    setup = build.build_attack(cfg, base, iterations=cfg.calib_iterations, eot=cfg.calib_eot)
    bar = _Bar(x_cal.shape[0], "calibrate: attack vs constant t*", _quiet(args))
    x_adv = _craft(setup, x_cal, y_cal, cfg, gen, bar)
    bar.close()
    policy = SSNI(
        model,
        t_star=cfg.t_star,
        reweight="sigmoid" if cfg.policy == "ssni-n" else "linear",
        levels=cfg.levels,
        batch_joined=cfg.batch_joined,
    ).to(dev)
    admissible = [
        b
        for b in cfg.calib_biases
        if 0 < cfg.t_star + b <= 1 and (cfg.policy == "ssni-n" or b >= 0)
    ] or [0.0]
    levels = int((level_grid(cfg.t_star, admissible) > 0).sum())
    total = x_stats.shape[0] + 2 * x_cal.shape[0] * (1 + levels)
    bar = _Bar(total, "calibrate: statistics, norms and level grid", _quiet(args))
    result = calibrate(
        policy,
        purifier,
        classifier,
        x_stats,
        x_cal,
        y_cal,
        x_adv,
        taus=cfg.calib_taus,
        biases=cfg.calib_biases,
        objective=cfg.calib_objective,
        min_robust=cfg.calib_min_robust,
        weight=cfg.calib_weight,
        votes=cfg.votes,
        batch_size=cfg.batch_size,
        generator=gen,
        progress=bar,
    )
    bar.close()
    seconds = time.perf_counter() - start
    policy_path = Path(args.policy_out) if args.policy_out else out / "policy.json"
    info = {
        "calibration": result.to_dict(),
        "attack": None if setup is None else setup.description + " vs constant t*",
        "data": {"dataset": cfg.dataset, "stats_split": cfg.stats_split, "calib_split": "val"},
        "score_model": cfg.score_model or build.DEFAULT_MODELS[cfg.dataset][0],
        "score_model_path": cfg.score_model_path,
        "config": cfg.to_dict(),
    }
    save_policy(policy_path, policy, info=info)
    reports.write_json(out / "calibration.json", {**result.to_dict(), "seconds": seconds})
    rows = []
    for r in result.table:
        tau = "std" if r["tau"] is None else f"{r['tau_std_multiple']:.3g} std"
        rows.append(
            f"| {tau} | {r['bias']:.3g} | {100 * r['clean_acc']:.1f} | "
            f"{100 * r['robust_acc']:.1f} | {1000 * r['mean_t_clean']:.1f} | "
            f"{1000 * r['mean_t_adv']:.1f} | {'yes' if r['feasible'] else 'no'} |"
        )
    table = (
        "| tau | b | clean acc (%) | robust acc (%) | mean t clean | mean t adv | feasible |\n"
        "|---|---:|---:|---:|---:|---:|---|\n" + "\n".join(rows) + "\n"
    )
    base_line = (
        f"constant t* = {cfg.t_star:g}: clean {100 * result.baseline['clean_acc']:.1f} %, "
        f"robust {100 * result.baseline['robust_acc']:.1f} % "
        f"({result.n_calibration} validation images, transfer attack from constant t*)"
    )
    chosen = result.chosen
    text = (
        f"# Calibration of {cfg.policy} ({cfg.name})\n\n{base_line}\n\n{table}\n"
        f"chosen: tau = {chosen['tau']}, b = {chosen['bias']:g} "
        f"(clean {100 * chosen['clean_acc']:.1f} %, robust {100 * chosen['robust_acc']:.1f} %, "
        f"objective {result.objective}, robust floor {100 * result.min_robust:.1f} %)\n"
    )
    write_text_atomic(out / "calibration.md", text)
    _emit(text)
    _emit(f"wrote {policy_path} ({seconds:.1f} s); use it with --set policy_file={policy_path}")
    return 0


# ----------------------------------------------------------------------------- analyze-t


@locks_out
def cmd_analyze_t(args) -> int:
    from ..core.defense import Defense
    from ..core.policies import SSNI, Constant
    from ..eval import reports
    from ..eval.analysis import analyze_t
    from ..io.files import write_text_atomic
    from . import build

    _setup(args)
    cfg = _load(args)
    out = Path(args.out)
    start = time.perf_counter()
    model = build.build_score_model(cfg)
    classifier = build.build_classifier(cfg)
    purifier = build.build_purifier(cfg, model)
    gen = build.seeded_generator(cfg.seeds[0], cfg.device)
    if cfg.policy == "constant" and not cfg.policy_file:
        overlay = cfg.replace(policy="ssni-n")  # show where SSNI-N would put each sample
    else:
        overlay = cfg
    fitting = overlay.policy != "constant" and not overlay.policy_file
    bar = _Bar(overlay.stats_n if fitting else 0, "clean score norms", _quiet(args))
    policy = build.build_policy(
        overlay, model, generator=build.seeded_generator(cfg.subset_seed), progress=bar
    )
    bar.close()
    if not isinstance(policy, SSNI):
        policy = None
    x, y = build.eval_images(cfg)
    x, y = x.to(cfg.device), y.to(cfg.device)
    _write_config(out, cfg)  # inputs checked: the first write
    base = Defense(classifier, purifier, Constant(cfg.t_star))
    setup = build.build_attack(cfg, base)
    t_count = len(cfg.t_grid)
    bar = _Bar(x.shape[0] * (1 + 2 * t_count), "analyze-t", _quiet(args))
    x_adv = _craft(setup, x, y, cfg, gen, bar)
    result = analyze_t(
        purifier,
        classifier,
        x,
        y,
        sorted(cfg.t_grid),
        cfg.t_star,
        x_adv=x_adv,
        policy=policy,
        votes=cfg.votes,
        batch_size=cfg.batch_size,
        generator=gen,
        progress=bar,
    )
    bar.close()
    seconds = time.perf_counter() - start
    doc = {
        "name": cfg.name,
        "attack": None if setup is None else setup.description + " vs constant t*",
        "seconds": seconds,
        **result.to_dict(),
        "config": cfg.to_dict(),
    }
    reports.write_json(out / "analysis.json", doc)
    fr = result.fractions()
    reports.plot_t_map(
        result.t_grid,
        {
            "clean": (result.clean_correct, result.clean_t),
            "adversarial": (result.adv_correct, result.adv_t),
        },
        out / "t_map.png",
        t_star=cfg.t_star,
        title=f"{cfg.name}: correctness per sample and level",
    )
    curves = {k: v for k, v in result.accuracy_curves().items()}
    reports.plot_accuracy_vs_t(result.t_grid, curves, out / "accuracy_vs_t.png", t_star=cfg.t_star)
    figures = ["t_map.png", "accuracy_vs_t.png"]
    if result.clean_t is not None:
        levels = {"clean": result.clean_t}
        if result.adv_t is not None:
            levels["adversarial"] = result.adv_t
        reports.plot_t_hist(levels, out / "t_hist.png", t_star=cfg.t_star)
        figures.append("t_hist.png")
    lines = [
        f"# Per-sample optimal t ({cfg.name}, {x.shape[0]} images, t* = {cfg.t_star:g})",
        "",
        f"clean samples right only at t < t*:       {_pct(fr['clean_right_only_below_t_star'])}",
        f"adversarial samples right only at t > t*: {_pct(fr['adv_right_only_above_t_star'])}",
        f"clean never right on the grid:            {_pct(fr['clean_never_right'])}",
        f"adversarial never right on the grid:      {_pct(fr['adv_never_right'])}",
        "",
        "| t | " + " | ".join(f"{1000 * t:g}" for t in result.t_grid.tolist()) + " |",
        "|---|" + "---:|" * t_count,
    ]
    for label, acc in curves.items():
        lines.append(f"| {label} acc (%) | " + " | ".join(f"{100 * a:.1f}" for a in acc) + " |")
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "analysis.md", text)
    _emit(text)
    _emit(f"wrote analysis.json, analysis.md, {', '.join(figures)} to {out} ({seconds:.1f} s)")
    return 0


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


# ----------------------------------------------------------------------------- report


@locks_out
def cmd_report(args) -> int:
    from ..eval import reports

    _setup(args)
    dirs = [Path(d) for d in args.dirs]
    for d in dirs:
        path = d / reports.REPORT_JSON if d.is_dir() else d
        if not path.is_file():
            raise UsageError(f"{d}: no {reports.REPORT_JSON} (not an `ssni evaluate` output)")
    try:
        summary = reports.merge_reports(dirs)
    except (ValueError, json.JSONDecodeError) as err:
        raise UsageError(str(err).splitlines()[0]) from None
    if args.out:
        rows = []
        for d in dirs:
            rows += reports.read_report(d)["rows"]
        reports.write_report(args.out, _dedupe(rows), title="Comparison")
    _emit(reports.markdown_table(summary))
    return 0


def _dedupe(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    seen, out = set(), []
    for r in rows:
        key = json.dumps([r.get("name"), r.get("seed"), r.get("config")], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


# ----------------------------------------------------------------------------- registration


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
    _add_config_args(p)
    p.set_defaults(func=cmd_evaluate, torchrun=True)

    p = subparsers.add_parser(
        "presets",
        help="list the configuration presets (one per row of the paper's tables)",
        description="List presets: those in $SSNI_CONFIG_DIR, ./configs and the package.",
    )
    p.add_argument("--show", metavar="NAME", help="print one preset's resolved configuration")
    p.add_argument("--keys", action="store_true", help="list every key with its type and default")
    p.add_argument("--quiet", dest="sub_quiet", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_presets)

    p = subparsers.add_parser(
        "calibrate",
        help="choose SSNI's tau and b on validation data; writes a policy file",
        description="Fit clean score-norm statistics on the validation split and grid-search "
        "tau (calib_taus, multiples of the clean std) and b (calib_biases) to maximise clean "
        "accuracy with robust accuracy >= calib_min_robust (negative: the constant-t* "
        "defense's) against a cheap attack (calib_iterations, calib_eot), or the weighted "
        "objective. Never reads the test split.",
        epilog=f"example: ssni calibrate --preset {EXAMPLE_PRESET} --out runs/cal\n"
        "         ssni evaluate --preset ... --set policy_file=runs/cal/policy.json --out ...",
        formatter_class=fmt,
    )
    _add_config_args(p)
    p.add_argument(
        "--policy-out",
        metavar="FILE",
        help="policy file (.json or .safetensors); default OUT/policy.json",
    )
    p.set_defaults(func=cmd_calibrate)

    p = subparsers.add_parser(
        "analyze-t",
        help="per-sample correctness over a grid of constant t (motivation figure)",
        description="Purify every sample (clean, and adversarial against the constant-t* "
        "defense) at each level of t_grid; report the fraction of clean samples right only "
        "below t* and of adversarial ones right only above it; draw the per-sample map with "
        "SSNI's t(x).",
        epilog=f"example: ssni analyze-t --preset {EXAMPLE_PRESET} --set n=64 --out runs/t",
        formatter_class=fmt,
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_analyze_t)

    p = subparsers.add_parser(
        "report",
        help="merge evaluate runs into one comparison table (mean +- std over seeds)",
        description="Merge the report.json of several `ssni evaluate` output directories.",
        epilog="example: ssni report runs/a runs/b --out runs/table",
        formatter_class=fmt,
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="evaluate output directories")
    p.add_argument("--out", metavar="DIR", help="also write the merged report files here")
    p.add_argument("--quiet", dest="sub_quiet", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_report)
