"""Command ``ssni calibrate``: choose SSNI's tau and b on validation data; writes a policy file."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..eval.streams import seeded_generator
from .common import (
    EXAMPLE_PRESET,
    add_config_args,
    craft,
    emit,
    load_run_config,
    quiet,
    setup_logging,
    write_config,
)
from .outdir import locks_out
from .progress import Progress


@locks_out
def cmd_calibrate(args) -> int:
    from ..core.defense import Defense
    from ..core.policies import REWEIGHT, SSNI, Constant
    from ..eval import reports
    from ..eval.calibrate import calibrate, level_grid, save_policy
    from ..io.files import write_text_atomic
    from . import build
    from .config import ConfigError

    setup_logging(args)
    cfg = load_run_config(args)
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
    write_config(out, cfg)  # inputs checked: the first write
    gen = seeded_generator(cfg.seeds[0], dev)
    base = Defense(classifier, purifier, Constant(cfg.t_star))
    setup = build.build_attack(cfg, base, iterations=cfg.calib_iterations, eot=cfg.calib_eot)
    bar = Progress(x_cal.shape[0], "calibrate: attack vs constant t*", quiet(args))
    x_adv = craft(setup, x_cal, y_cal, cfg, gen, bar)
    bar.close()
    policy = SSNI(
        model,
        t_star=cfg.t_star,
        reweight=REWEIGHT[cfg.policy],
        probe_levels=cfg.levels,
        batch_joined=cfg.batch_joined,
        probe_size=cfg.purify_size or None,
    ).to(dev)
    admissible = [
        b
        for b in cfg.calib_biases
        if 0 < cfg.t_star + b <= 1 and (cfg.policy == "ssni-n" or b >= 0)
    ] or [0.0]
    levels = int((level_grid(cfg.t_star, admissible) > 0).sum())
    total = x_stats.shape[0] + 2 * x_cal.shape[0] * (1 + levels)
    bar = Progress(total, "calibrate: statistics, norms and level grid", quiet(args))
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
    text = reports.calibration_markdown(result, cfg.name, cfg.policy, cfg.t_star)
    write_text_atomic(out / "calibration.md", text)
    emit(text)
    emit(f"wrote {policy_path} ({seconds:.1f} s); use it with --set policy_file={policy_path}")
    return 0


def register(subparsers) -> None:
    """Add the command to ``ssni``'s subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
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
    add_config_args(p)
    p.add_argument(
        "--policy-out",
        metavar="FILE",
        help="policy file (.json or .safetensors); default OUT/policy.json",
    )
    p.set_defaults(func=cmd_calibrate)
