"""What SSNI costs next to constant-t DiffPure: network calls, wall time and clean accuracy.

One run, one model and one data set: the shipped Fashion-MNIST UNet and CNN, ``--n`` clean test
images (seeded subset 0), DDPM steps of 1/1000, for each ``--t-star``:

* ``constant``: DiffPure at ``t*`` for every sample (``1000 t*`` reverse steps);
* ``SSNI-N`` / ``SSNI-L``: the K-level EPS probe, then ``ceil(1000 t(x))`` reverse steps per
  sample (statistics from 256 validation images, ``tau`` = std of the clean norms, ``b`` = 0);
* ``reference``: the scheme of the SSNI reference code: the same probe and levels as SSNI-N, then
  every sample goes through all ``1000 (t* + b)`` steps of the loop (a sample is only updated
  once the loop reaches its own level), i.e. ``K + 1000 (t* + b)`` calls per image.

Each batch of ``--batch`` images runs every scheme in turn (the order rotates from batch to
batch), so the batches are interleaved repeats; wall seconds per image are the median over
batches, ratios are medians of the per-batch ratios. Network evaluations per image and clean
accuracy are over all ``--n`` images. ``--attack`` then times one PGD iteration with EOT
``--eot`` through a ``--surrogate-steps``-step surrogate on ``--attack-n`` images (its own
interleaved repeats), for constant and SSNI-N, with the old estimator (passes one after the
other, the probe re-run in every pass as one un-chunked call) and the new one (passes batched to
``--max-batch`` images per call, one shared probe per gradient estimate, probe chunked).
``--batch-scaling`` times one score-network call per image at batch sizes 1-128 and records how
many images SSNI-N's reverse loop has active at each step, which shows how much of SSNI's higher
cost per network evaluation comes from its partial batches.

Results are appended to ``--cache`` (JSON lines) as they are measured, so a run can be split
into short invocations (``--t-star 0.1``, then ``--t-star 0.3``, ``--attack``) and the table is
printed from everything cached (``--report`` prints it without measuring).

Usage::

    nice -n 5 python benchmarks/bench_cost.py --t-star 0.1 --threads 2
    nice -n 5 python benchmarks/bench_cost.py --attack --threads 2
    nice -n 5 python benchmarks/bench_cost.py --batch-scaling --threads 2
    python benchmarks/bench_cost.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import ssni
from ssni.attacks import PGD, Surrogate, ThreatModel
from ssni.cli import build
from ssni.cli.config import RunConfig
from ssni.core.purifiers import to_image_space, to_model_space
from ssni.core.sampling import ddim_step

CLEAN_SCHEMES = ("constant", "SSNI-N", "SSNI-L", "reference")


class ReferenceScheme(nn.Module):
    """The SSNI reference code's reverse loop: levels from an SSNI policy, every sample noised to
    its own level, then the whole batch goes through all ``round(1000 * max_level)`` steps of the
    DDPM loop and a sample is updated only once the loop time is at or below its level."""

    def __init__(self, classifier: nn.Module, model, policy) -> None:
        super().__init__()
        self.classifier = classifier
        self.model = model
        self.policy = policy

    def forward(self, x, generator=None):
        schedule = self.model.schedule
        t = self.policy(x, generator=generator)
        x_t, _ = schedule.perturb(to_model_space(x), t, generator=generator)
        steps = round(self.policy.max_level * schedule.num_steps)
        own = torch.round(t * schedule.num_steps)
        cur = x_t
        for k in range(steps, 0, -1):
            tk = torch.full_like(t, k / schedule.num_steps)
            sk = torch.full_like(t, (k - 1) / schedule.num_steps)
            new = ddim_step(self.model.eps(cur, tk), cur, tk, sk, schedule, generator)
            active = (own >= k).reshape(-1, 1, 1, 1)
            cur = torch.where(active, new, cur)
        return self.classifier(to_image_space(cur))


def _policies(model, t_star, levels, stats, generator_seed=0):
    out = {}
    for name, reweight in (("SSNI-N", "sigmoid"), ("SSNI-L", "linear")):
        p = ssni.SSNI(model, t_star=t_star, reweight=reweight, probe_levels=levels)
        p.fit([stats[i : i + 64] for i in range(0, stats.shape[0], 64)],
              generator=_gen(stats.device, generator_seed))
        out[name] = p
    return out


def _gen(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _devices(args):
    """``(label, device, accelerate)`` of each measured setting: the CPU always (unless
    ``--device cuda``), and with a GPU present the GPU as is and with ``accelerate`` (bf16
    autocast, channels_last, torch.compile of the score network)."""
    out = [] if args.device == "cuda" else [("cpu", "cpu", False)]
    if args.device != "cpu" and torch.cuda.is_available():
        out += [("cuda", "cuda", False), ("cuda+accelerate", "cuda", True)]
    elif args.device == "cuda":
        raise SystemExit("--device cuda: no GPU is visible")
    return out


def _clock(device: str) -> float:
    """``time.perf_counter()`` after the device's queued work is done."""
    if device != "cpu":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _load(args, device: str = "cpu", accelerate: bool = False):
    cfg = RunConfig(dataset="fashion-mnist", n=args.n, subset_seed=0)
    model = build.build_score_model(cfg).to(device)
    model.accelerate = accelerate  # ignored on the CPU
    classifier = build.build_classifier(cfg).to(device)
    x, y = build.eval_images(cfg)
    stats, _ = build.heldout_images(cfg, 256)
    return model, classifier, x.to(device), y.to(device), stats.to(device)


def _cache_rows(path: Path):
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def measure_clean(args, cache: Path) -> None:
    for label, device, accelerate in _devices(args):
        _measure_clean(args, cache, label, device, accelerate)


def _measure_clean(args, cache: Path, label: str, device: str, accelerate: bool) -> None:
    model, classifier, x, y, stats = _load(args, device, accelerate)
    done = {(r["t_star"], r["batch"], r["scheme"]) for r in _cache_rows(cache)
            if r.get("part") == "clean" and r.get("device", "cpu") == label}
    for t_star in args.t_star:
        pol = _policies(model, t_star, args.levels, stats)
        schemes = {
            "constant": ssni.Defense(classifier, ssni.DiffPure(model), ssni.Constant(t_star)),
            "SSNI-N": ssni.Defense(classifier, ssni.DiffPure(model), pol["SSNI-N"]),
            "SSNI-L": ssni.Defense(classifier, ssni.DiffPure(model), pol["SSNI-L"]),
            "reference": ReferenceScheme(classifier, model, pol["SSNI-N"]),
        }
        n_batches = -(-x.shape[0] // args.batch)
        for bi in range(n_batches):
            xb = x[bi * args.batch : (bi + 1) * args.batch]
            yb = y[bi * args.batch : (bi + 1) * args.batch]
            order = list(CLEAN_SCHEMES[bi % 4 :] + CLEAN_SCHEMES[: bi % 4])
            for name in order:
                if (t_star, bi, name) in done:
                    continue
                defense = schemes[name]
                gen = _gen(device, 1000 + bi)
                with torch.no_grad(), ssni.count_network_calls(defense) as calls:
                    start = _clock(device)
                    logits = defense(xb, generator=gen)
                    wall = _clock(device) - start
                probe_wall = None
                if name.startswith("SSNI"):  # the probe's share, timed on its own
                    with torch.no_grad():
                        g2 = _gen(device, 1000 + bi)
                        start = _clock(device)
                        defense.policy(xb, generator=g2)
                        probe_wall = _clock(device) - start
                row = {
                    "part": "clean", "t_star": t_star, "batch": bi, "scheme": name,
                    "images": int(xb.shape[0]), "wall": wall, "probe_wall": probe_wall,
                    "evals": calls.images, "calls": calls.calls,
                    "correct": int((logits.argmax(1) == yb).sum()),
                    "load": os.getloadavg()[0], "threads": torch.get_num_threads(),
                    "device": label,
                }
                _append(cache, row)
                print(f"[{label}] t*={t_star} batch {bi} {name:9s} "
                      f"{wall / xb.shape[0]:.3f} s/image "
                      f"{calls.images / xb.shape[0]:.1f} evals/image (load {row['load']:.1f})",
                      flush=True)


def _attack_estimators(max_batch):
    return {
        "old": dict(batched=False, share_levels=False),
        "new": dict(batched=True, max_batch=max_batch, share_levels=True),
    }


def measure_attack(args, cache: Path) -> None:
    for label, device, accelerate in _devices(args):
        _measure_attack(args, cache, label, device, accelerate)


def _measure_attack(args, cache: Path, label: str, device: str, accelerate: bool) -> None:
    model, classifier, x, y, stats = _load(args, device, accelerate)
    t_star = args.attack_t_star
    pol = _policies(model, t_star, args.levels, stats)["SSNI-N"]
    xb, yb = x[: args.attack_n], y[: args.attack_n]
    done = {(r["repeat"], r["scheme"], r["path"]) for r in _cache_rows(cache)
            if r.get("part") == "attack" and r.get("device", "cpu") == label}
    combos = [(s, p) for s in ("constant", "SSNI-N") for p in ("old", "new")]
    for rep in range(args.attack_repeats):
        order = combos[rep % 4 :] + combos[: rep % 4]
        for scheme, path in order:
            if (rep, scheme, path) in done:
                continue
            policy = ssni.Constant(t_star) if scheme == "constant" else pol
            old_chunk = policy.chunk_size if hasattr(policy, "chunk_size") else None
            if hasattr(policy, "chunk_size"):
                policy.chunk_size = 0 if path == "old" else None  # old: one probe call
            real = ssni.Defense(classifier, ssni.DiffPure(model), policy)
            cheap = ssni.Defense(
                classifier, ssni.DiffPure(model, reverse_steps=args.surrogate_steps), policy
            )
            est = Surrogate(cheap, n=args.eot, **_attack_estimators(args.max_batch)[path])
            attack = PGD(ThreatModel("Linf", 0.1), iterations=1, step_size=0.03, gradient=est)
            gen = _gen(device, 7 + rep)
            with ssni.count_network_calls(cheap, real) as calls:
                start = _clock(device)
                attack(real, xb, yb, gen)
                wall = _clock(device) - start
            if hasattr(policy, "chunk_size"):
                policy.chunk_size = old_chunk
            row = {
                "part": "attack", "repeat": rep, "scheme": scheme, "path": path,
                "images": int(xb.shape[0]), "wall": wall, "evals": calls.images,
                "calls": calls.calls, "eot": args.eot, "surrogate_steps": args.surrogate_steps,
                "max_batch": args.max_batch, "t_star": t_star,
                "load": os.getloadavg()[0], "threads": torch.get_num_threads(),
                "device": label,
            }
            _append(cache, row)
            print(f"[{label}] attack repeat {rep} {scheme:8s} {path}: "
                  f"{wall / xb.shape[0]:.2f} s/image "
                  f"{calls.images / xb.shape[0]:.0f} evals/image (load {row['load']:.1f})",
                  flush=True)


def measure_scaling(args, cache: Path) -> None:
    """Seconds per image of one score-network call at several batch sizes (interleaved repeats),
    and the active-batch profile of SSNI-N's reverse loop on the first ``--batch`` images."""
    for label, device, accelerate in _devices(args):
        _measure_scaling(args, cache, label, device, accelerate)


def _measure_scaling(args, cache: Path, where: str, device: str, accelerate: bool) -> None:
    model, classifier, x, y, stats = _load(args, device, accelerate)
    done = {(r["repeat"], r["size"]) for r in _cache_rows(cache)
            if r.get("part") == "scaling" and r.get("device", "cpu") == where}
    sizes = [s for s in (1, 2, 4, 8, 16, 32, 64, 128) if s <= x.shape[0]]
    label = torch.full((max(sizes),), 0.05, device=device)
    for rep in range(args.scaling_repeats):
        order = sizes[rep % len(sizes):] + sizes[: rep % len(sizes)]
        for size in order:
            if (rep, size) in done:
                continue
            xb = to_model_space(x[:size])
            calls = max(1, 128 // size)  # about 128 images per measurement
            with torch.no_grad():
                model.eps(xb, label[:size])  # warm-up at this shape
                start = _clock(device)
                for _ in range(calls):
                    model.eps(xb, label[:size])
                wall = _clock(device) - start
            row = {"part": "scaling", "repeat": rep, "size": size, "wall": wall,
                   "images": size * calls, "load": os.getloadavg()[0],
                   "threads": torch.get_num_threads(), "device": where}
            _append(cache, row)
            print(f"[{where}] scaling repeat {rep} batch {size:4d}: "
                  f"{1000 * wall / row['images']:.2f} ms/image (load {row['load']:.1f})",
                  flush=True)
    if where == "cpu" and not any(r.get("part") == "profile" for r in _cache_rows(cache)):
        xb = x[: args.batch]
        for t_star in args.t_star:
            pol = _policies(model, t_star, args.levels, stats)["SSNI-N"]
            with torch.no_grad():
                t = pol(xb, generator=_gen(device, 1000))
            own = torch.round(t * model.schedule.num_steps).long()
            top = round(pol.max_level * model.schedule.num_steps)
            active = [int((own >= k).sum()) for k in range(top, 0, -1)]
            _append(cache, {"part": "profile", "t_star": t_star, "batch": int(xb.shape[0]),
                            "active": active, "load": os.getloadavg()[0],
                            "threads": torch.get_num_threads()})


def _scaling_report(rows) -> None:
    scal = [r for r in rows if r.get("part") == "scaling"]
    if not scal:
        return
    per = {}
    for r in scal:
        per.setdefault(r["size"], []).append(r["wall"] / r["images"])
    ms = {s: 1000 * _median(v) for s, v in sorted(per.items())}
    reps = len({r["repeat"] for r in scal})
    print(f"\nscore network, seconds per image of one call by batch size ({reps} interleaved "
          "repeats, median):")
    print("  " + "  ".join(f"{s}: {v:.2f} ms" for s, v in ms.items()))
    sizes = sorted(ms)

    def cost(n: int) -> float:  # ms per call of n images, interpolated on the measured sizes
        if n <= 0:
            return 0.0
        lo = max([s for s in sizes if s <= n] or [sizes[0]])
        hi = min([s for s in sizes if s >= n] or [sizes[-1]])
        if hi == lo:
            return ms[lo] * n
        w = (n - lo) / (hi - lo)
        return ((1 - w) * ms[lo] + w * ms[hi]) * n

    for r in (r for r in rows if r.get("part") == "profile"):
        active, b = r["active"], r["batch"]
        evals = sum(active)
        if not evals:
            continue
        ssni_ms = sum(cost(n) for n in active)
        const_ms = len(active) * cost(b)
        inflation = (ssni_ms / evals) / (const_ms / (len(active) * b))
        print(f"  t* = {r['t_star']}: SSNI-N's reverse loop on {b} clean images runs "
              f"{evals / b:.1f} steps per image in calls of {min(a for a in active if a)}-"
              f"{max(active)} images; at the measured per-call costs each of its network "
              f"evaluations costs {inflation:.2f}x one of constant's full-batch calls, and the "
              f"loop takes {ssni_ms / const_ms:.2f}x constant's time for "
              f"{evals / (len(active) * b):.2f}x its evaluations")


def _median(values):
    return statistics.median(values) if values else float("nan")


def report(cache: Path) -> None:
    """Print the tables from the cache, one block per measured device setting."""
    rows = _cache_rows(cache)
    labels = []
    for r in rows:
        label = r.get("device", "cpu")  # rows written before GPU rows existed: CPU
        if label not in labels:
            labels.append(label)
    for label in labels:
        print(f"\n=== {label} ===")
        _report([r for r in rows if r.get("device", "cpu") == label])


def _report(rows) -> None:
    clean = [r for r in rows if r.get("part") == "clean"]
    loads = [r["load"] for r in rows]
    if loads:
        print(f"conditions: {min(r['threads'] for r in rows)}-{max(r['threads'] for r in rows)} "
              f"torch threads, 1-minute load average {min(loads):.1f}-{max(loads):.1f} "
              f"(median {_median(loads):.1f}) on this machine while measuring")
    for t_star in sorted({r["t_star"] for r in clean}):
        sub = [r for r in clean if r["t_star"] == t_star]
        batches = sorted({r["batch"] for r in sub})
        full = [b for b in batches if len({r["scheme"] for r in sub if r["batch"] == b}) == 4]
        if not full:
            continue
        by = {(r["batch"], r["scheme"]): r for r in sub}
        n = sum(by[(b, "constant")]["images"] for b in full)
        print(f"\nclean purification, t* = {t_star}, {n} test images in {len(full)} "
              f"interleaved batches of {by[(full[0], 'constant')]['images']}")
        print(f"  {'scheme':10s} {'evals/image':>12s} {'s/image':>9s} {'ms/eval':>8s} "
              f"{'probe s/img':>12s} {'clean acc':>10s}")
        for s in CLEAN_SCHEMES:
            rs = [by[(b, s)] for b in full]
            evals = sum(r["evals"] for r in rs) / n
            wall = _median([r["wall"] / r["images"] for r in rs])
            per_eval = _median([1000 * r["wall"] / r["evals"] for r in rs])
            probe = [r["probe_wall"] / r["images"] for r in rs if r["probe_wall"] is not None]
            acc = sum(r["correct"] for r in rs) / n
            probe_s = f"{_median(probe):.3f}" if probe else "-"
            print(f"  {s:10s} {evals:12.1f} {wall:9.3f} {per_eval:8.2f} {probe_s:>12s} "
                  f"{100 * acc:9.1f}%")
        for num in ("SSNI-N", "SSNI-L"):
            for den in ("constant", "reference"):
                calls = sum(by[(b, num)]["evals"] for b in full) / sum(
                    by[(b, den)]["evals"] for b in full)
                wall = _median([by[(b, num)]["wall"] / by[(b, den)]["wall"] for b in full])
                spread = [by[(b, num)]["wall"] / by[(b, den)]["wall"] for b in full]
                print(f"  {num}/{den}: network evaluations {calls:.2f}, wall time {wall:.2f} "
                      f"(per batch {min(spread):.2f}-{max(spread):.2f})")
    _scaling_report(rows)
    att = [r for r in rows if r.get("part") == "attack"]
    if att:
        r0 = att[0]
        reps = sorted({r["repeat"] for r in att})
        print(f"\none PGD iteration, EOT {r0['eot']}, surrogate of {r0['surrogate_steps']} steps, "
              f"t* = {r0['t_star']}, {r0['images']} images, {len(reps)} interleaved repeats; "
              f"new path: passes batched to {r0['max_batch']} images per call, one probe per "
              "estimate, chunked")
        by = {(r["repeat"], r["scheme"], r["path"]): r for r in att}
        for s in ("constant", "SSNI-N"):
            for p in ("old", "new"):
                rs = [by[(k, s, p)] for k in reps if (k, s, p) in by]
                if not rs:
                    continue
                print(f"  {s:8s} {p}: {rs[0]['evals'] / rs[0]['images']:7.0f} evals/image, "
                      f"{_median([r['wall'] / r['images'] for r in rs]):7.2f} s/image")
            ratios = [by[(k, s, "old")]["wall"] / by[(k, s, "new")]["wall"] for k in reps
                      if (k, s, "old") in by and (k, s, "new") in by]
            if ratios:
                print(f"  {s}: old/new wall time {_median(ratios):.2f} "
                      f"(per repeat {min(ratios):.2f}-{max(ratios):.2f})")
        ratios = [by[(k, "SSNI-N", "new")]["wall"] / by[(k, "constant", "new")]["wall"]
                  for k in reps if (k, "SSNI-N", "new") in by and (k, "constant", "new") in by]
        if ratios:
            print(f"  SSNI-N/constant per iteration (new path): wall time {_median(ratios):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t-star", type=float, nargs="*", default=[0.1, 0.3])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--levels", type=int, default=20)
    parser.add_argument("--attack", action="store_true", help="time one attack iteration only")
    parser.add_argument("--attack-n", type=int, default=16)
    parser.add_argument("--attack-repeats", type=int, default=3)
    parser.add_argument("--attack-t-star", type=float, default=0.1)
    parser.add_argument("--batch-scaling", action="store_true",
                        help="time one network call per batch size; SSNI-N's active batches")
    parser.add_argument("--scaling-repeats", type=int, default=5)
    parser.add_argument("--eot", type=int, default=20)
    parser.add_argument("--surrogate-steps", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--cache", default="bench_cost.jsonl")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the CPU, plus GPU rows (as is and with accelerate) when a "
                        "GPU is present")
    parser.add_argument("--report", action="store_true", help="print the cached table only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    if not args.report:
        if args.attack:
            measure_attack(args, cache)
        elif args.batch_scaling:
            measure_scaling(args, cache)
        else:
            measure_clean(args, cache)
    report(cache)


if __name__ == "__main__":
    main()
