"""Command ``ssni demo``: constant-t DiffPure vs SSNI-N vs SSNI-L on Fashion-MNIST, attacked."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from .outdir import locks_out

log = logging.getLogger("ssni.demo")

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"


DEMO_PRESETS = (
    ("constant", "fmnist-diffpure-constant-pgd-linf"),
    ("SSNI-N", "fmnist-diffpure-ssni-n-pgd-linf"),
    ("SSNI-L", "fmnist-diffpure-ssni-l-pgd-linf"),
)


@locks_out
def cmd_demo(args) -> int:
    """Constant-t DiffPure vs SSNI-N vs SSNI-L on Fashion-MNIST with the shipped models,
    attacked with PGD+EOT (Linf) through a fewer-step surrogate of each defense."""
    from ..eval import reports
    from .config import load_config
    from .evaluate import run_config

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    overrides = [f"n={args.n}", f"seeds=[{args.seed}]", f"batch_size={min(args.n, 64)}"]
    if args.data_dir:
        overrides.append(f"data_dir={args.data_dir}")
    overrides += list(args.overrides)
    start = time.perf_counter()
    rows: List[Dict[str, Any]] = []
    auc: Dict[str, float] = {}
    levels: Dict[str, List[float]] = {}
    undefended: Dict[str, Any] = {}
    configs = [(label, preset, load_config(preset, overrides)) for label, preset in DEMO_PRESETS]
    cfg = configs[-1][2]
    print(
        f"Fashion-MNIST demo: {cfg.n} test images (seeded subset {cfg.subset_seed}), "
        f"DiffPure DDPM t*={cfg.t_star:g} with {cfg.purify_steps or 'one per 1/1000'} "
        f"reverse steps; PGD Linf eps={cfg.eps:g}, {cfg.iterations} iterations, "
        f"step {cfg.step_size:g}, EOT {cfg.eot}, gradients through a "
        f"{cfg.surrogate_steps}-step surrogate (Lee & Kim 2023 protocol, reduced budget); "
        f"SSNI: K={cfg.levels} levels, statistics from {cfg.stats_n} validation images; "
        f"seed {cfg.seeds[0]}"
    )
    for label, preset, cfg in configs:
        print(f"[{label}] {preset}")
        result = run_config(cfg, out / preset, progress=not args.quiet)
        for row in result.rows:
            row["name"] = f"DiffPure + {label}"
        rows.extend(result.rows)
        report = result.report
        undefended = undefended or dict(report.undefended or {})
        tc = [v for v in report.t_clean if v is not None]
        ta = [v for v in report.t_adv if v is not None]
        if cfg.policy != "constant":  # a constant policy is the t* line of the figure
            levels[f"{label} clean"] = tc
            levels[f"{label} adversarial"] = ta
        ec = [v for v in report.score_norm_clean if v is not None]
        ea = [v for v in report.score_norm_adv if v is not None]
        if ec and ea:
            auc[label] = reports.roc_auc(ec, ea)
            reports.plot_score_norm_hist(
                ec, ea, out / f"score_norms_{label.lower()}.png", title=f"DiffPure + {label}"
            )
        for w in report.warnings:
            print(f"  warning: {w}")
    seconds = time.perf_counter() - start
    extra = {
        "roc_auc_score_norm": auc,
        "undefended": undefended,
        "seconds": seconds,
        "presets": dict(DEMO_PRESETS),
    }
    paths = reports.write_report(out, rows, title="Fashion-MNIST demo", extra=extra)
    reports.plot_t_hist(
        {k: v for k, v in levels.items() if v}, out / "t_hist.png", t_star=cfg.t_star,
        title="Per-sample noise levels t(x)",
    )
    print()
    print((out / reports.REPORT_MD).read_text(encoding="utf-8"))
    if undefended:
        print(
            f"Undefended classifier on the first {undefended['samples']} images: clean "
            f"{100 * undefended['clean_accuracy']:.1f}%, under the same attack "
            f"{100 * undefended['robust_accuracy']:.1f}%"
        )
    for label, value in auc.items():
        print(f"ROC AUC of the score norm e(x), clean vs PGD examples ({label} run): {value:.3f}")
    print(
        f"wrote {', '.join(p.name for p in paths.values())}, score_norms_*.png, t_hist.png "
        f"and one folder per defense to {out} in {seconds / 60:.1f} min"
    )
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="SSNI vs constant-t DiffPure on Fashion-MNIST, attacked (about 10 min on a CPU)",
        description=cmd_demo.__doc__,
    )
    p.add_argument("--data-dir", default="", help="Fashion-MNIST idx files (default: Debian's)")
    p.add_argument("--n", type=int, default=256, help="test images (seeded subset)")
    p.add_argument("--seed", type=int, default=121, help="attack/purification seed")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a configuration key of every demo row (see `ssni presets`)",
    )
    p.add_argument("--out", default="demo-output", help="output folder")
    p.set_defaults(func=cmd_demo)
