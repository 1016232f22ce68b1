"""Attacks through the SSNI policy, three ways, on one preset (default: the Fashion-MNIST demo).

(a) reference: the level t(x_adv) is recomputed at every iteration but not differentiated;
(b) relaxed: the policy is differentiated (soft level through the sigmoid/linear map of the EPS
    norm, straight-through rounding), so the gradient also flows through e(x);
(c) score-norm-aware: (b) with the loss CE - lambda (e(x) - mu) / std, which pushes the
    adversarial input to look clean and receive less noise.

All three use the preset's attack (PGD, EOT, surrogate or full gradients) and are judged on the
real defense. Prints clean/robust accuracy (mean +- std over seeds), the mean levels and score
norms of clean and adversarial inputs, and the ROC AUC of e(x) separating them.

Usage: ``python benchmarks/ssni_policy_attacks.py [--preset NAME] [--set key=value ...]
[--lam 1.0] [--variants abc] [--out DIR]`` (each variant keeps a resumable log in ``DIR``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fmnist-diffpure-ssni-n-pgd-linf")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--lam", type=float, default=1.0, help="weight of the score norm")
    parser.add_argument("--out", default="runs/ssni-policy-attacks")
    parser.add_argument("--variants", default="abc", help="which of a, b, c to run")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from ssni import attacks
    from ssni.cli import build
    from ssni.cli.config import load_config
    from ssni.core.policies import SSNI
    from ssni.eval.protocol import evaluate
    from ssni.eval.reports import roc_auc

    cfg = load_config(args.preset, args.overrides)
    parts = build.build_components(cfg, generator=build.seeded_generator(cfg.subset_seed))
    if not isinstance(parts.policy, SSNI):
        raise SystemExit(f"{args.preset} does not use an SSNI policy")
    x, y = build.eval_images(cfg)
    base = build.build_attack(cfg.replace(adaptive_t=False), parts.defense)
    relaxed_setup = build.build_attack(cfg.replace(adaptive_t=True), parts.defense)
    score_loss = attacks.ScoreNormLoss(parts.policy, lam=args.lam)
    variants = {
        "(a) reference t(x), not differentiated": base,
        "(b) relaxed policy, gradient through e(x)": relaxed_setup,
        f"(c) relaxed + score-norm loss (lambda={args.lam:g})": build.AttackSetup(
            relaxed_setup.attack.with_loss(score_loss), relaxed_setup.target,
            relaxed_setup.description,
        ),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{cfg.name}: {x.shape[0]} images, {base.description}")
    for i, (name, setup) in enumerate(variants.items()):
        if "abc"[i] not in args.variants:
            continue
        report = evaluate(
            parts.defense, setup.attack, (x.to(cfg.device), y.to(cfg.device)),
            seeds=cfg.seeds, votes=cfg.votes, batch_size=cfg.batch_size,
            surrogate=None if setup.target is parts.defense else setup.target,
            log_path=out / f"variant_{'abc'[i]}.jsonl", progress=args.progress,
            sanity_checks=(i == 0), sanity_samples=min(64, x.shape[0]),
        )
        e_c = np.array(report.score_norm_clean, dtype=float)
        e_a = np.array(report.score_norm_adv, dtype=float)
        print(name)
        print(
            f"  clean {100 * report.clean_accuracy:.1f} +- {100 * report.clean_accuracy_std:.1f} %"
            f", robust {100 * report.robust_accuracy:.1f} +- "
            f"{100 * report.robust_accuracy_std:.1f} %"
        )
        print(
            f"  mean t: clean {1000 * np.mean(report.t_clean):.1f}, adv "
            f"{1000 * np.mean(report.t_adv):.1f} (of 1000 steps); mean e(x): clean "
            f"{e_c.mean():.2f}, adv {e_a.mean():.2f}; ROC AUC {roc_auc(e_c, e_a):.3f}"
        )
        for w in report.warnings:
            print(f"  WARNING: {w}")


if __name__ == "__main__":
    main()
