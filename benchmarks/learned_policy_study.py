"""Constant vs SSNI-N vs SSNI-L vs the learned policy (SSNI-Learned), on Fashion-MNIST DiffPure.

Every row is one ``ssni evaluate`` configuration (a shipped preset plus overrides) run one seed at
a time into ``OUT/<row>/seed<S>/`` (resumable JSONL logs: killing and restarting loses nothing).
Rows:

* the reference attack (the preset's surrogate PGD-EOT Linf; the level ``t(x_adv)`` is recomputed
  at every iteration but not differentiated), for the four policies;
* an attack the learned policy never saw in training (PGD-EOT L2, eps 1.5), for the four policies;
* the adaptive attack through the policy (``adaptive_t=true``: the attack differentiates through
  ``t(x)``: the EPS norm for SSNI-N/L, the learned network for SSNI-Learned, straight-through
  rounding), for the three sample-specific policies;
* the constrained low-norm attack (``attack=constrained``, :class:`ssni.attacks.TwoPhase`: first
  lower ``e(x)`` below the clean 90th percentile of the policy's clean statistics, then the
  surrogate PGD-EOT Linf attack with a hinge keeping it there), for the three sample-specific
  policies (the learned one needs a policy file with clean statistics).

``--summary`` (also written at the end of a run) reads the ``report.json`` files only and prints
a markdown table: clean and robust accuracy, mean +- std over the seeds that finished, mean t of
clean and adversarial inputs and the network calls per image of one defended prediction
(EPS probe + reverse steps actually taken).

Usage: ``python benchmarks/learned_policy_study.py [--out DIR] [--seeds 121 122 123]
[--set key=value ...] [--rows NAME ...] [--summary]``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

BASE = "fmnist-diffpure"
L2 = ["norm=l2", "eps=1.5", "step_size=0.4"]
ADAPTIVE = ["adaptive_t=true"]
CONSTRAINED = ["attack=constrained"]

#: name -> (preset, overrides, label)
ROWS: Dict[str, Tuple[str, List[str], str]] = {
    "constant-linf": (f"{BASE}-constant-pgd-linf", [], "constant t*"),
    "ssni-n-linf": (f"{BASE}-ssni-n-pgd-linf", [], "SSNI-N"),
    "ssni-l-linf": (f"{BASE}-ssni-l-pgd-linf", [], "SSNI-L"),
    "learned-linf": (f"{BASE}-ssni-learned-pgd-linf", [], "SSNI-Learned"),
    "learned-linf-adaptive": (f"{BASE}-ssni-learned-pgd-linf", ADAPTIVE, "SSNI-Learned"),
    "ssni-n-linf-adaptive": (f"{BASE}-ssni-n-pgd-linf", ADAPTIVE, "SSNI-N"),
    "ssni-l-linf-adaptive": (f"{BASE}-ssni-l-pgd-linf", ADAPTIVE, "SSNI-L"),
    "learned-constrained": (f"{BASE}-ssni-learned-pgd-linf", CONSTRAINED, "SSNI-Learned"),
    "ssni-n-constrained": (f"{BASE}-ssni-n-pgd-linf", CONSTRAINED, "SSNI-N"),
    "ssni-l-constrained": (f"{BASE}-ssni-l-pgd-linf", CONSTRAINED, "SSNI-L"),
    "constant-l2": (f"{BASE}-constant-pgd-linf", L2, "constant t*"),
    "ssni-n-l2": (f"{BASE}-ssni-n-pgd-linf", L2, "SSNI-N"),
    "ssni-l-l2": (f"{BASE}-ssni-l-pgd-linf", L2, "SSNI-L"),
    "learned-l2": (f"{BASE}-ssni-learned-pgd-linf", L2, "SSNI-Learned"),
}
ATTACKS = {
    "linf": "reference: surrogate PGD-EOT Linf 0.1, t(x_adv) recomputed, not differentiated",
    "linf-adaptive": "adaptive: surrogate PGD-EOT Linf 0.1, gradient through t(x)",
    "l2": "unseen in training: surrogate PGD-EOT L2 1.5",
    "constrained": "constrained: e(x) lowered below the clean p90, then surrogate PGD-EOT Linf "
    "0.1 with a hinge on e(x)",
}


def _attack_of(row: str) -> str:
    if row.endswith("-adaptive"):
        return "linf-adaptive"
    return row.rsplit("-", 1)[1]


def _config(row: str, seed: int, extra: List[str]):
    from ssni.cli.config import load_config

    preset, overrides, _ = ROWS[row]
    cfg = load_config(preset, ["n=64", *overrides, *extra, f"seeds={seed}"])
    return cfg.replace(name=row)


def run(out: Path, seeds: List[int], rows: List[str], extra: List[str]) -> None:
    from ssni.cli import build
    from ssni.cli.evaluate import run_config

    for seed in seeds:
        for row in rows:
            cfg = _config(row, seed, extra)
            implied = build.policy_overrides(cfg)
            if implied:
                cfg = cfg.replace(**implied)
            dest = out / row / f"seed{seed}"
            if (dest / "report.json").is_file() and _complete(dest, cfg.n):
                continue
            print(f"[{row} seed {seed}] running into {dest}", flush=True)
            result = run_config(cfg, dest, progress=False)
            print(f"[{row} seed {seed}] done in {result.seconds:.0f} s", flush=True)
    print(summary(out))


def clean_only(out: Path, seeds: List[int], rows: List[str], extra: List[str]) -> None:
    """The clean half of each row without the attack (cheap): the same passes and probe as
    ``evaluate`` on the same noise streams, written to ``OUT/<row>/seed<S>/clean.json``."""
    from ssni.cli import build
    from ssni.eval.protocol import _passes, _probe
    from ssni.eval.streams import keyed_generator

    for seed in seeds:
        for row in rows:
            cfg = _config(row, seed, extra)
            implied = build.policy_overrides(cfg)
            if implied:
                cfg = cfg.replace(**implied)
            dest = out / row / f"seed{seed}" / "clean.json"
            if dest.is_file():
                continue
            parts = build.build_components(cfg, generator=build.seeded_generator(cfg.subset_seed))
            x, y = build.eval_images(cfg)
            correct, levels = [], []
            for start in range(0, x.shape[0], cfg.batch_size):
                xb, yb = x[start : start + cfg.batch_size], y[start : start + cfg.batch_size]
                gen = keyed_generator(xb.device, seed, start, 0)
                preds = _passes(parts.defense, xb, cfg.votes, gen)
                t, _ = _probe(parts.defense, xb, gen)
                correct += (preds.mode(0).values == yb).tolist()
                levels += t.tolist()
            doc = {"clean_acc": sum(correct) / len(correct), "t_clean": levels, "n": len(correct),
                   "seed": seed, "config": cfg.to_dict()}
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(json.dumps(doc))
            print(f"[{row} seed {seed}] clean {100 * doc['clean_acc']:.1f} %, mean t "
                  f"{1000 * sum(levels) / len(levels):.1f}", flush=True)


def _complete(dest: Path, n: int) -> bool:
    log = dest / "log.jsonl"
    if not log.is_file():
        return False
    count = sum(1 for line in log.read_text().splitlines() if '"index"' in line)
    return count >= n


def _mean_std(values: List[float]) -> Tuple[float, float]:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0
    return m, s


def _calls(cfg: dict, t: List[float]) -> Optional[float]:
    """Network calls of one defended prediction, averaged over inputs with levels ``t``."""
    if not t:
        return None
    probe = cfg["levels"] if cfg["policy"] != "constant" else 0
    steps = cfg["purify_steps"]
    per = [probe + (steps if steps else math.ceil(round(v * 1000, 6))) * (v > 0) for v in t]
    return sum(per) / len(per)


def summary(out: Path) -> str:
    lines = [
        "| attack | policy | seeds | clean acc (%) | robust acc (%) | mean t clean | "
        "mean t adv | calls/image clean | calls/image adv |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row, (_, _, label) in ROWS.items():
        per_seed = []
        for rep in sorted((out / row).glob("seed*/report.json")):
            doc = json.loads(rep.read_text())
            cfg = doc["extra"]["resolved_config"]
            recs = [
                json.loads(line)
                for line in (rep.parent / "log.jsonl").read_text().splitlines()
                if '"index"' in line
            ]
            recs = [r.get("record", r) for r in recs if "index" in r]
            if len(recs) < cfg["n"]:
                continue
            t_c = [r["t_clean"] for r in recs if r.get("t_clean") is not None]
            t_a = [r["t_adv"] for r in recs if r.get("t_adv") is not None]
            m = doc["rows"][0]["metrics"]
            per_seed.append(
                (m["clean_acc"], m["robust_acc"], _calls(cfg, t_c), _calls(cfg, t_a),
                 sum(t_c) / len(t_c) if t_c else None, sum(t_a) / len(t_a) if t_a else None,
                 cfg["seeds"][0])
            )
        if not per_seed:
            continue
        c_m, c_s = _mean_std([p[0] for p in per_seed])
        r_m, r_s = _mean_std([p[1] for p in per_seed])

        def avg(k, scale=1.0, fmt="{:.1f}", per_seed=per_seed):
            vals = [p[k] for p in per_seed if p[k] is not None]
            return fmt.format(scale * sum(vals) / len(vals)) if vals else "-"

        seeds = ",".join(str(p[6]) for p in per_seed)
        lines.append(
            f"| {ATTACKS[_attack_of(row)].split(':')[0]} | {label} | {seeds} | "
            f"{_pm(c_m, c_s, len(per_seed))} | {_pm(r_m, r_s, len(per_seed))} | "
            f"{avg(4, 1000)} | {avg(5, 1000)} | {avg(2)} | {avg(3)} |"
        )
    lines += [
        "",
        "Clean half only (`--clean-only`: the same passes and noise streams as `evaluate`, no "
        "attack):",
        "",
        "| policy | seeds | clean acc (%) | mean t clean | calls/image |",
        "|---|---|---:|---:|---:|",
    ]
    for row, (_, _, label) in ROWS.items():
        docs = [json.loads(p.read_text()) for p in sorted((out / row).glob("seed*/clean.json"))]
        if not docs:
            continue
        acc = _mean_std([d["clean_acc"] for d in docs])
        t_all = [v for d in docs for v in d["t_clean"]]
        calls = _calls(docs[0]["config"], t_all)
        lines.append(
            f"| {label} | {','.join(str(d['seed']) for d in docs)} | "
            f"{_pm(acc[0], acc[1], len(docs))} | {1000 * sum(t_all) / len(t_all):.1f} | "
            f"{calls:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _pm(mean: float, std: float, count: int) -> str:
    return f"{100 * mean:.1f} +- {100 * std:.1f}" if count > 1 else f"{100 * mean:.1f}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/learned-policy-study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[121, 122, 123])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--summary", action="store_true", help="only print the table")
    parser.add_argument("--clean-only", action="store_true",
                        help="only the clean half of each row (no attack)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    if args.summary:
        sys.stdout.write(summary(out))
        return 0
    if args.clean_only:
        clean_only(out, args.seeds, args.rows, args.overrides)
        return 0
    run(out, args.seeds, args.rows, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
