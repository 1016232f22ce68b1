"""Command ``train-policy``: train the learned noise-level policy on the validation split.

Reads ``learn_n`` validation images (never the test split), crafts adversarial versions with a
cheap attack against the constant-``t*`` defense (``calib_iterations``, ``calib_eot``), builds the
probe features and the correctness table over ``[0, t* + b]`` (spacing ``learn_resolution``,
``learn_votes`` draws per entry), chooses the under-noising weight among ``learn_weights`` on a
held-out share and trains :class:`ssni.LearnedPolicy` (see :mod:`ssni.eval.learn`). With
``learn_t_min = -1`` (the default) it also chooses the policy's floor ``t_min`` among the table's
levels: each candidate level is attacked directly (the same cheap attack against the constant
defense at that level) and a floor counts only what survives that attack. Writes the
policy file (safetensors with JSON metadata: settings, training result, data, command), the
training data (``data.pt``, reused by a rerun with the same data settings) and
``training.json``/``training.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import time
from pathlib import Path

import torch

from ..eval.streams import seeded_generator
from .common import EXAMPLE_PRESET, add_config_args, craft, emit, quiet, setup_logging, write_config
from .outdir import locks_out
from .progress import Progress

LEARNED_EXAMPLE = "fmnist-diffpure-ssni-learned-pgd-linf"

# configuration keys that fix the training data (a rerun with the same values reuses data.pt)
DATA_KEYS = (
    "dataset", "data_dir", "subset_seed", "score_model", "score_model_path", "classifier",
    "classifier_path", "purifier", "rule", "t_star", "purify_steps", "gdmp_distance",
    "gdmp_scale", "gdmp_rounds", "gns_stages", "bias", "levels", "attack", "norm", "eps",
    "step_size", "gradient", "surrogate_steps", "calib_iterations", "calib_eot", "learn_n",
    "learn_resolution", "learn_votes", "seeds", "batch_size",
)


def _data_key(cfg) -> str:
    values = {k: getattr(cfg, k) for k in DATA_KEYS}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


@locks_out
def cmd_train_policy(args) -> int:
    from ..attacks.levels import at_levels
    from ..core.defense import Defense
    from ..core.learned import LearnedPolicy
    from ..core.policies import Constant
    from ..eval import reports
    from ..eval.calibrate import save_policy
    from ..eval.learn import (
        PolicyData,
        floor_candidates,
        floor_correctness,
        policy_data,
        train_policy,
    )
    from ..io.files import replacing, write_text_atomic
    from . import build
    from .config import load_config

    setup_logging(args)
    # a preset's policy_file names the shipped policy: this command writes a new one instead
    cfg = load_config(args.preset, args.overrides).replace(policy="ssni-learned", policy_file="")
    out = Path(args.out)

    write_config(out, cfg)
    start = time.perf_counter()
    model = build.build_score_model(cfg)
    classifier = build.build_classifier(cfg)
    purifier = build.build_purifier(cfg, model)
    dev = cfg.device
    choose_floor = cfg.learn_t_min < 0
    policy = LearnedPolicy(
        model, t_star=cfg.t_star, bias=cfg.bias, levels=cfg.levels, hidden=cfg.learn_hidden,
        t_min=0.0 if choose_floor else cfg.learn_t_min,
    ).to(dev)
    key = _data_key(cfg)
    cache = out / "data.pt"
    data = None
    attack_desc = None
    if cache.is_file():
        doc = torch.load(cache, weights_only=True)
        if doc.get("key") == key:
            data = PolicyData(**doc["data"])
            attack_desc = doc.get("attack")
    x = y = None
    if data is None:
        # the validation split only: the learned policy never sees test images
        x, y = build.load_images(cfg, "val", cfg.learn_n, cfg.subset_seed)
        x, y = x.to(dev), y.to(dev)
        gen = seeded_generator(cfg.seeds[0], dev)
        base = Defense(classifier, purifier, Constant(cfg.t_star))
        setup = build.build_attack(cfg, base, iterations=cfg.calib_iterations, eot=cfg.calib_eot)
        attack_desc = setup.description + " vs constant t*"
        bar = Progress(x.shape[0], "attack (constant t*)", quiet(args))
        x_adv = craft(setup, x, y, cfg, gen, bar)
        bar.close()
        n_levels = int(round((cfg.t_star + cfg.bias) / cfg.learn_resolution)) + 2
        bar = Progress(2 * x.shape[0] * (1 + n_levels), "probe and table", quiet(args))
        data = policy_data(
            policy, purifier, classifier, x, y, x_adv, resolution=cfg.learn_resolution,
            votes=cfg.learn_votes, batch_size=cfg.batch_size, generator=gen, progress=bar,
        )
        bar.close()
        with replacing(cache) as tmp:
            torch.save({"key": key, "attack": attack_desc, "data": data.to_dict()}, tmp)
    floors = floor_candidates(data, policy) if choose_floor else None
    todo = [f for f in (floors or []) if data.floor_column(f) is None]
    if todo:
        # each candidate floor under the same cheap attack aimed at the constant defense at
        # that level (t*: the training attack itself, its column of the table)
        if x is None:
            x, y = build.load_images(cfg, "val", cfg.learn_n, cfg.subset_seed)
            x, y = x.to(dev), y.to(dev)
        t_col = int((data.grid - cfg.t_star).abs().argmin())
        cols = []
        bar = Progress(x.shape[0] * len(todo), "attack (candidate floors)", quiet(args))
        for level in todo:
            if abs(level - float(data.grid[t_col])) < 1e-9:
                cols.append(data.table_adv[:, t_col].bool().cpu())
                bar(x.shape[0])
                continue
            gen = seeded_generator(cfg.seeds[0], dev)
            at = at_levels(Defense(classifier, purifier, Constant(cfg.t_star)), [level])
            setup = build.build_attack(cfg, at, iterations=cfg.calib_iterations,
                                       eot=cfg.calib_eot)
            x_f = craft(setup, x, y, cfg, gen, bar)
            cols.append(floor_correctness(classifier, purifier, x_f, y, level,
                                          batch_size=cfg.batch_size, generator=gen))
        bar.close()
        data = data.with_floors(torch.tensor(todo, dtype=torch.float64), torch.stack(cols, 1))
        with replacing(cache) as tmp:
            torch.save({"key": key, "attack": attack_desc, "data": data.to_dict()}, tmp)
    result = train_policy(
        policy,
        data,
        under_weights=cfg.learn_weights,
        select_fraction=cfg.learn_select_fraction,
        objective=cfg.calib_objective,
        min_robust=cfg.calib_min_robust,
        weight=cfg.calib_weight,
        steps=cfg.learn_steps,
        seed=cfg.seeds[0],
        floors=floors,
    )
    seconds = time.perf_counter() - start
    policy_path = Path(args.policy_out) if args.policy_out else out / "policy.safetensors"
    info = {
        "training": result.to_dict(),
        "attack": attack_desc,
        "data": {"dataset": cfg.dataset, "split": "val", "n": cfg.learn_n,
                 "subset_seed": cfg.subset_seed, "key": key},
        "score_model": cfg.score_model or build.DEFAULT_MODELS[cfg.dataset][0],
        "command": _command(args),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": cfg.to_dict(),
    }
    save_policy(policy_path, policy.cpu(), info=info)
    reports.write_json(out / "training.json", {**result.to_dict(), "seconds": seconds,
                                                "attack": attack_desc})
    text = _markdown(cfg, result, attack_desc)
    write_text_atomic(out / "training.md", text)
    emit(text)
    emit(f"wrote {policy_path} ({seconds:.1f} s); use it with --set policy_file={policy_path}")
    return 0


def _command(args) -> str:
    parts = ["ssni", "train-policy"]
    if args.preset:
        parts += ["--preset", args.preset]
    for o in args.overrides:
        parts += ["--set", o]
    parts += ["--out", args.out]
    if args.policy_out:
        parts += ["--policy-out", args.policy_out]
    return " ".join(shlex.quote(p) for p in parts)


def _markdown(cfg, result, attack_desc) -> str:
    def pct(v):
        return f"{100 * v:.1f}"

    def cell(r, k):
        return pct(r[k]) if k in r else "-"

    rows = "\n".join(
        f"| {1000 * r.get('t_min', 0.0):g} | {r['under_weight']:g} | {pct(r['clean_acc'])} | "
        f"{pct(r['robust_acc'])} | {cell(r, 'robust_transfer')} | {cell(r, 'robust_floor')} | "
        f"{1000 * r['mean_t_clean']:.1f} | {1000 * r['mean_t_adv']:.1f} | "
        f"{cell(r, 'at_floor_clean')} | {'yes' if r['feasible'] else 'no'} |"
        for r in result.table
    )
    tg = result.targets
    if result.floor_selected:
        fr = ", ".join(f"{1000 * float(k):g}: {pct(v)} %" for k, v in tg["floor_robust"].items())
        floor_text = (
            f"Floor chosen together with the weight among levels "
            f"{', '.join(f'{1000 * f:g}' for f in result.floors)} (x 1/1000); robust accuracy "
            f"of the constant defense at each level under the same attack aimed at it ({fr}, "
            "all images). A row's robust accuracy is the per-image worst case of the transfer "
            "attack at the policy's level and the attack aimed at its floor.\n\n"
        )
    else:
        floor_text = f"Floor fixed at {1000 * result.t_min:g}/1000 (learn_t_min).\n\n"
    return (
        f"# Learned policy ({cfg.name}), t* = {cfg.t_star:g}, b = {cfg.bias:g}\n\n"
        f"{cfg.learn_n} validation images and adversarial versions ({attack_desc}); "
        f"levels {', '.join(f'{1000 * t:g}' for t in result.grid)} (x 1/1000), "
        f"{cfg.learn_votes} draw(s) per entry.\n"
        f"targets: mean clean {1000 * (tg['mean_clean'] or 0):.1f}, mean adversarial "
        f"{1000 * tg['mean_adv']:.1f}; clean right nowhere {pct(tg['clean_right_nowhere'])} %, "
        f"adversarial right nowhere {pct(tg['adv_right_nowhere'])} %, clean right without "
        f"purification {pct(tg['clean_at_zero'])} %.\n\n"
        + floor_text
        + f"Choosing on {result.n_select} held-out images "
        f"(trained on {result.n_fit}); constant t*: clean {pct(result.baseline['clean_acc'])} %, "
        f"robust {pct(result.baseline['robust_acc'])} %\n\n"
        "| floor | weight | clean acc (%) | robust acc (%) | robust, transfer (%) | "
        "robust, at floor (%) | mean t clean | mean t adv | clean at floor (%) | feasible |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n" + rows + "\n\n"
        f"chosen floor {1000 * result.t_min:g}/1000, weight {result.under_weight:g} "
        f"({result.objective}); retrained on all "
        f"{result.n_fit + result.n_select} images: clean {pct(result.final['clean_acc'])} %, "
        f"robust {pct(result.final['robust_acc'])} % (training images, read off the table)\n"
    )


def register(subparsers) -> None:
    """Add ``train-policy`` to ``ssni``'s subparsers."""
    p = subparsers.add_parser(
        "train-policy",
        help="train the learned noise-level policy on validation data; writes a policy file",
        description=__doc__.split("\n\n")[1],
        epilog=f"example: ssni train-policy --preset {LEARNED_EXAMPLE} --out runs/lp\n"
        f"         ssni evaluate --preset {EXAMPLE_PRESET} --set policy=ssni-learned "
        "--set policy_file=runs/lp/policy.safetensors --out ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--policy-out", metavar="FILE",
                   help="policy file (.safetensors); default OUT/policy.safetensors")
    p.set_defaults(func=cmd_train_policy)
