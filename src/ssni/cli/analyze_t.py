"""Command ``ssni analyze-t``: per-sample correctness over a grid of constant levels."""

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
def cmd_analyze_t(args) -> int:
    from ..core.defense import Defense
    from ..core.policies import SSNI, Constant
    from ..eval import reports
    from ..eval.analysis import analyze_t
    from ..io.files import write_text_atomic
    from . import build

    setup_logging(args)
    cfg = load_run_config(args)
    out = Path(args.out)
    start = time.perf_counter()
    model = build.build_score_model(cfg)
    classifier = build.build_classifier(cfg)
    purifier = build.build_purifier(cfg, model)
    gen = seeded_generator(cfg.seeds[0], cfg.device)
    if cfg.policy == "constant" and not cfg.policy_file:
        overlay = cfg.replace(policy="ssni-n")  # show where SSNI-N would put each sample
    else:
        overlay = cfg
    fitting = overlay.policy != "constant" and not overlay.policy_file
    bar = Progress(overlay.stats_n if fitting else 0, "clean score norms", quiet(args))
    policy = build.build_policy(
        overlay, model, generator=seeded_generator(cfg.subset_seed), progress=bar
    )
    bar.close()
    if not isinstance(policy, SSNI):
        policy = None
    x, y = build.eval_images(cfg)
    x, y = x.to(cfg.device), y.to(cfg.device)
    write_config(out, cfg)  # inputs checked: the first write
    base = Defense(classifier, purifier, Constant(cfg.t_star))
    setup = build.build_attack(cfg, base)
    t_count = len(cfg.t_grid)
    bar = Progress(x.shape[0] * (1 + 2 * t_count), "analyze-t", quiet(args))
    x_adv = craft(setup, x, y, cfg, gen, bar)
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
    text = reports.analysis_markdown(result, cfg.name, x.shape[0], cfg.t_star)
    write_text_atomic(out / "analysis.md", text)
    emit(text)
    emit(f"wrote analysis.json, analysis.md, {', '.join(figures)} to {out} ({seconds:.1f} s)")
    return 0


def register(subparsers) -> None:
    """Add the command to ``ssni``'s subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
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
    add_config_args(p)
    p.set_defaults(func=cmd_analyze_t)
