"""Attacks through the SSNI policy, compared on the same images and seeds, with a worst case.

Attacks (``--attacks``, by name; each is also ``ssni evaluate --set attack=...``):

* ``reference``: the preset's PGD; ``t(x_adv)`` is recomputed at every iteration, never
  differentiated (the SSNI paper's attack);
* ``relaxed``: the same PGD with the policy made differentiable (soft level, straight-through
  rounding), so gradients also flow through the EPS norm ``e(x)``;
* ``constrained``: :class:`ssni.attacks.TwoPhase`, first lowering ``e(x)``, then PGD on the
  classification loss with an adaptive hinge on ``e(x)`` above the clean 90th percentile;
* ``clean-levels``: PGD whose gradients come from the defense run at levels drawn from the clean
  ``t(x)`` histogram (EOT over ``t``), transferred to the real policy.

Each (preset, eps, attack, seed) keeps resumable JSONL logs under ``--out``, one per block of
``--block`` images; killing the run loses at most the chunk in progress, and rerunning the same
command resumes. Work is done seed by seed (all of seed 121 first), then eps, then block by block
(every preset and attack on one block of images before the next block), so a run cut short
still compares all attacks on the same images.

Per attack the table shows, for the three protocols of a random defense (one-shot, worst-of-N,
success at any iteration with its control, the same number of clean queries), robust accuracy
(mean +- std over seeds), mean ``t(x_adv)``, the fraction of ``x_adv`` with ``e(x)`` below the clean
90th percentile (of the same test images' clean norms), the lowest ``e(x)`` any iterate reached,
and network calls per image of the attack. The worst case over all attacks (AutoAttack style:
robust only if every attack fails) ends each block. Sanity checks fail loudly (exit code 1): the
gradient of ``t(x)`` must be non-zero, and the constrained attack must reach lower ``e(x)`` than
the reference.

Usage::

    python benchmarks/ssni_policy_attacks.py [--presets P ...] [--eps 0.1 0.03]
        [--attacks reference constrained ...] [--seeds 121 122 123] [--set key=value ...]
        [--worst-of 4] [--out DIR] [--report-only] [--progress]
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import sys
from pathlib import Path

import numpy as np

PRESETS = ["fmnist-diffpure-ssni-n-pgd-linf", "fmnist-diffpure-ssni-l-pgd-linf"]
ATTACKS = {
    "reference": {"attack": "pgd", "adaptive_t": False},
    "relaxed": {"attack": "pgd", "adaptive_t": True},
    "constrained": {"attack": "constrained", "adaptive_t": False},
    "clean-levels": {"attack": "clean-levels", "adaptive_t": False},
}
POLICY_AWARE = ("relaxed", "constrained", "clean-levels")


def _log_dir(out: Path, preset: str, eps: float, attack: str, seed: int) -> Path:
    return out / preset / f"eps{eps:g}" / attack / f"seed{seed}"


def _block_name(start: int, stop: int) -> str:
    return f"images{start:05d}-{stop:05d}.jsonl"


def read_records(folder: Path):
    """Sample records of the block logs in ``folder`` (plain or ``.gz``), with ``index`` made
    global (block start added); empty if there are none."""
    out = []
    files = sorted(folder.glob("images*.jsonl")) + sorted(folder.glob("images*.jsonl.gz"))
    for path in files:
        start = int(path.name[len("images"):].split("-")[0])
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("kind") == "sample":
                    out.append(dict(rec["record"], index=rec["record"]["index"] + start))
    return out


def _worst_n(folder: Path, default: int) -> int:
    """N of worst-of-N from the first block log's configuration line."""
    for path in sorted(folder.glob("images*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            try:
                return int(json.loads(f.readline())["config"]["worst_of"])
            except (ValueError, KeyError, TypeError):
                break
    return default


def _pct(stat) -> str:
    if stat is None:
        return "-"
    return f"{100 * stat['mean']:.1f} +- {100 * stat['std']:.1f}"


def _row(name, records, n, control, worst_of):
    from ssni.eval.worst import protocol_accuracy

    seeds = sorted({r["seed"] for r in records})
    e_clean = np.array([r["score_norm_clean"] for r in records], dtype=float)
    e_adv = np.array([r["score_norm_adv"] for r in records], dtype=float)
    p90 = float(np.quantile(e_clean, 0.9))
    t_adv = 1000 * np.mean([r["t_adv"] for r in records])
    # e(x) of points that fooled the defense: the constrained attack's lowest over its iterates,
    # else the final example of a non-robust sample
    fooling = [r["fooled_norm"] if "fooled_norm" in r else
               (r["score_norm_adv"] if r["clean_correct"] and not r["robust"] else None)
               for r in records]
    fooling = np.array([v for v in fooling if v is not None and np.isfinite(v)], dtype=float)
    fool_txt = (f"{fooling.min():.0f} / {np.median(fooling):.0f} ({fooling.size})"
                if fooling.size else "- (0)")
    calls = [r.get("network_calls") for r in records if r.get("network_calls")]
    call_txt = "-"
    if calls:
        call_txt = ", ".join(f"{k} {np.mean([c[k] for c in calls]):.0f}" for k in calls[0])
    any_it = protocol_accuracy(records, "any-iteration")
    any_txt = _pct(any_it)
    if any_it is not None and control is not None:
        any_txt += f" (control {_pct(control)})"
    clean = protocol_accuracy(
        [dict(r, robust=r["clean_correct"]) for r in records], "one-shot"
    )
    return (
        f"| {name} | {len(records) // max(1, len(seeds))} x {len(seeds)} | {_pct(clean)} | "
        f"{_pct(protocol_accuracy(records, 'one-shot'))} | "
        f"{_pct(protocol_accuracy(records, 'worst-of-N'))} | {any_txt} | {t_adv:.1f} | "
        f"{100 * np.mean(e_adv <= p90):.1f} | {np.mean(e_adv):.0f} | "
        f"{fool_txt} | {call_txt} |"
    )


def report(out: Path, presets, eps_list, attack_names, seeds, worst_n) -> int:
    """Print the tables from the logs; returns the number of failed sanity checks."""
    from ssni.eval.checks import SanityError, lower_norm_check
    from ssni.eval.worst import worst_of

    failed = 0
    for preset in presets:
        for eps in eps_list:
            members = {}
            for name in attack_names:
                recs = []
                for seed in seeds:
                    recs += read_records(_log_dir(out, preset, eps, name, seed))
                if recs:
                    members[name] = recs
            if not members:
                continue
            # compare on the (seed, image) pairs that every attack has finished
            common = set.intersection(
                *[{(r["seed"], r["index"]) for r in recs} for recs in members.values()]
            )
            members = {k: [r for r in v if (r["seed"], r["index"]) in common]
                       for k, v in members.items()}
            if not common:
                continue
            worst_n = _worst_n(
                _log_dir(out, preset, eps, next(iter(members)), seeds[0]), worst_n
            )
            e_all = np.array([r["score_norm_clean"] for v in members.values() for r in v],
                             dtype=float)
            print(f"\n### {preset}, Linf eps = {eps:g}\n")
            print("clean e(x) of these images: p10 / p50 / p90 = "
                  + " / ".join(f"{np.quantile(e_all, q):.0f}" for q in (0.1, 0.5, 0.9)) + "\n")
            print(
                "| Attack | images x seeds | clean (%) | robust one-shot (%) | "
                f"robust worst-of-{worst_n} (%) | robust any-iteration (%) | mean t(x_adv) "
                "[steps] | x_adv with e <= clean p90 (%) | mean e(x_adv) | "
                "e of fooling points: min / median (count) | "
                "network calls / image of the attack |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            for name, recs in members.items():
                control = _control_accuracy(out, preset, recs)
                print(_row(name, recs, None, control, worst_n))
            if len(members) > 1:
                subset = members
                for label, names in (
                    ("worst case, all attacks", list(subset)),
                    ("worst case, policy-aware only", [k for k in subset if k in POLICY_AWARE]),
                ):
                    if not names:
                        continue
                    w = worst_of({k: subset[k] for k in names})
                    seeds_c = sorted({s for s, _ in common})
                    print(
                        f"| {label} ({', '.join(names)}) | {len(common) // len(seeds_c)} x "
                        f"{len(seeds_c)} | | {_pct(w['one-shot'])} | {_pct(w['worst-of-N'])} | "
                        f"{_pct(w['any-iteration'])} | | | | | |"
                    )
            ref = members.get("reference")
            if ref is not None:
                ref_by = {(r["seed"], r["index"]): r for r in ref}
                p90_by_seed = {}
                for r in ref:
                    p90_by_seed.setdefault(r["seed"], []).append(r["score_norm_clean"])
                p90_by_seed = {k: float(np.quantile(v, 0.9)) for k, v in p90_by_seed.items()}
                for name, recs in members.items():
                    if name == "reference":
                        continue
                    pairs = [(r, ref_by[(r["seed"], r["index"])]) for r in recs
                             if (r["seed"], r["index"]) in ref_by]
                    only = sum(1 for a, b in pairs if b["robust"] and not a["robust"])
                    missed = sum(1 for a, b in pairs if a["robust"] and not b["robust"])
                    low = [a for a, _ in pairs if "min_norm" in a]
                    line = (f"\n{name} vs reference, one-shot, same (seed, image) pairs "
                            f"({len(pairs)}): fooled only by {name}: {only}; fooled only by the "
                            f"reference: {missed}")
                    if low:
                        reach = sum(a["min_norm"] <= p90_by_seed[a["seed"]] for a in low)
                        fool_low = sum(a["fooled_norm"] <= p90_by_seed[a["seed"]] for a in low)
                        line += (f"; some iterate below the clean p90 of e(x): {reach}; an "
                                 f"iterate misclassified by one pass of the real defense below it: "
                                 f"{fool_low}")
                    print(line)
            for name in ("constrained",):
                if ref is None or name not in members:
                    continue
                keys = {(r["seed"], r["index"]): r for r in ref}
                pairs = [(r["score_norm_adv"], keys[(r["seed"], r["index"])]["score_norm_adv"])
                         for r in members[name] if (r["seed"], r["index"]) in keys]
                if not pairs:
                    continue
                a, b = zip(*pairs)
                try:
                    d = lower_norm_check(a, b, name)
                    print(f"\nsanity: {name} mean e(x_adv) is {-d:.1f} below the reference's "
                          f"({len(pairs)} samples)")
                except SanityError as err:
                    failed += 1
                    print(f"\nSANITY CHECK FAILED: {err}")
    print("\nProtocols: one-shot = the final example classified once; worst-of-N = robust only "
          "if all N purifications are right; any-iteration = robust only if no query during the "
          "attack and not the final example was misclassified (control: the clean images "
          "queried as often, no attack).")
    return failed


def _control(out, preset, cfg, parts, x, y, seed, start, stop) -> None:
    """Clean-query control of the any-iteration protocol on one block (cached in a JSON)."""
    from ssni.eval.worst import clean_query_control

    cpath = out / preset / "control.json"
    ctl = json.loads(cpath.read_text()) if cpath.exists() else {}
    key = f"{seed}:{start}-{stop}"
    if key in ctl:
        return
    queries = cfg.iterations + 1 + cfg.votes  # the most any attack here makes
    res = clean_query_control(parts.defense, x[start:stop], y[start:stop], queries,
                              seeds=[seed], batch_size=cfg.batch_size)
    ctl[key] = {"queries": queries, "right": res["flags"][0]}
    cpath.parent.mkdir(parents=True, exist_ok=True)
    cpath.write_text(json.dumps(ctl, sort_keys=True) + "\n")


def _control_accuracy(out, preset, records):
    """Control accuracy (mean/std over seeds) on the (seed, image) pairs of ``records``."""
    cpath = out / preset / "control.json"
    if not cpath.exists():
        return None
    flags = {}
    for key, val in json.loads(cpath.read_text()).items():
        seed, rng = key.split(":")
        start = int(rng.split("-")[0])
        for j, ok in enumerate(val["right"]):
            flags[(int(seed), start + j)] = ok
    per_seed = {}
    for r in records:
        k = (r["seed"], r["index"])
        if k not in flags:
            return None
        per_seed.setdefault(r["seed"], []).append(flags[k])
    vals = [float(np.mean(v)) for v in per_seed.values()]
    if not vals:
        return None
    return {"mean": float(np.mean(vals)),
            "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--eps", nargs="+", type=float, default=[0.1, 0.03])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[121, 122, 123])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--worst-of", type=int, default=4, help="N of the worst-of-N protocol")
    parser.add_argument("--block", type=int, default=16,
                        help="images per log file: every attack finishes a block before the next")
    parser.add_argument("--no-control", action="store_true", help="skip the clean-query control")
    parser.add_argument("--out", default="runs/ssni-policy-attacks")
    parser.add_argument("--report-only", action="store_true", help="tables from the logs only")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    if args.report_only:
        sys.exit(1 if report(out, args.presets, args.eps, args.attacks, args.seeds,
                             args.worst_of) else 0)

    from ssni import attacks
    from ssni.cli import build
    from ssni.cli.config import load_config
    from ssni.core.policies import SSNI
    from ssni.eval.checks import level_gradient_check
    from ssni.eval.protocol import evaluate
    from ssni.io.lock import LockError
    built = {}
    for preset in args.presets:
        cfg = load_config(preset, args.overrides)
        parts = build.build_components(cfg, generator=build.seeded_generator(cfg.subset_seed))
        if not isinstance(parts.policy, SSNI):
            raise SystemExit(f"{preset} does not use an SSNI policy")
        parts.policy.chunk_size = cfg.batch_size  # same norms, faster probe on CPU
        x, y = build.eval_images(cfg)
        x, y = x.to(cfg.device), y.to(cfg.device)
        grads = level_gradient_check(parts.policy, x[:8], build.seeded_generator(0, cfg.device))
        print(f"{preset}: {x.shape[0]} images; |d t / d x| on 8 clean images: "
              f"min {float(grads.min()):.3g}, max {float(grads.max()):.3g} (non-zero: ok)",
              flush=True)
        net = getattr(parts.score_model, "net", parts.score_model)
        built[preset] = (cfg, parts, x, y, {"score": net, "classifier": parts.classifier})

    setups = {}
    for seed in args.seeds:
        for eps in args.eps:
            n = built[args.presets[0]][2].shape[0]
            for start in range(0, n, args.block):
                stop = min(start + args.block, n)
                for preset in args.presets:
                    cfg, parts, x, y, modules = built[preset]
                    for name in args.attacks:
                        key = (preset, eps, name)
                        if key not in setups:  # built once (clean-levels probes images)
                            run_cfg = cfg.replace(eps=eps, **ATTACKS[name])
                            setups[key] = build.build_attack(run_cfg, parts.defense)
                        setup = setups[key]
                        attack = attacks.Counted(setup.attack.tracking(), modules)
                        folder = _log_dir(out, preset, eps, name, seed)
                        folder.mkdir(parents=True, exist_ok=True)
                        print(f"seed {seed} eps {eps:g} images {start}-{stop} {preset} {name}: "
                              f"{setup.description}", flush=True)
                        try:
                            evaluate(
                                setup.target, attack, (x[start:stop], y[start:stop]),
                                seeds=[seed], votes=cfg.votes, worst_of=args.worst_of,
                                batch_size=cfg.batch_size,
                                log_path=folder / _block_name(start, stop),
                                progress=args.progress,
                                sanity_checks=(name == "reference" and start == 0),
                                sanity_samples=min(64, stop - start),
                            )
                        except LockError as err:  # another process runs this block
                            print(f"  skipped: {err}", flush=True)
                    if not args.no_control and eps == args.eps[0]:
                        _control(out, preset, cfg, parts, x, y, seed, start, stop)

    sys.exit(1 if report(out, args.presets, args.eps, args.attacks, args.seeds,
                         args.worst_of) else 0)


if __name__ == "__main__":
    main()
