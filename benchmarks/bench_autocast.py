"""bf16 autocast of the attack's gradient passes (``attack_autocast = "bf16"``): speed and
agreement with the fp32 gradient, measured side by side.

One gradient estimate of the study's attack (surrogate PGD-EOT through a ``--surrogate-steps``
DDPM surrogate at ``--t-star``, EOT ``--eot``, shipped Fashion-MNIST UNet and CNN, constant
policy by default or SSNI-N with ``--policy ssni-n``) on ``--n`` test images, fp32 and bf16
interleaved over ``--repeats`` repeats (the order alternates; the first repeat warms up and is
not counted). Each repeat uses its own random stream, shared by the two precisions, so their
gradients differ only by precision. Printed:

* wall seconds per image of each precision and the fp32/bf16 ratio per repeat (median, range);
* agreement of the bf16 gradient with the fp32 one under the same noise (cosine per image and
  fraction of equal signs, the quantity a Linf step uses), next to the agreement of two fp32
  estimates under different noise: the EOT noise the attack already lives with.

Usage::

    python benchmarks/bench_autocast.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.functional import cosine_similarity

from ssni.cli import build
from ssni.cli.config import RunConfig


def _agreement(a: torch.Tensor, b: torch.Tensor):
    a, b = a.flatten(1), b.flatten(1)
    cos = cosine_similarity(a, b, dim=1).median().item()
    sign = (a.sign() == b.sign()).float().mean().item()
    return cos, sign


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--t-star", type=float, default=0.2)
    parser.add_argument("--surrogate-steps", type=int, default=10)
    parser.add_argument("--eot", type=int, default=4)
    parser.add_argument("--policy", choices=("constant", "ssni-n"), default="constant")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = RunConfig(
        dataset="fashion-mnist", n=args.n, subset_seed=0, t_star=args.t_star, purify_steps=0,
        gradient="surrogate", surrogate_steps=args.surrogate_steps, eot=args.eot,
        policy=args.policy, stats_split="val", stats_n=256, eps=0.1,
    )
    comp = build.build_components(cfg)
    x, y = build.eval_images(cfg)
    setups = {
        "fp32": build.build_attack(cfg, comp.defense),
        "bf16": build.build_attack(cfg.replace(attack_autocast="bf16"), comp.defense),
    }

    def estimate(name: str, seed: int):
        s = setups[name]
        gen = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        grad = s.attack.gradient(s.target.gradient, s.attack.loss, x, y, gen, need_loss=False).grad
        return grad, time.perf_counter() - start

    wall = {"fp32": [], "bf16": []}
    grads = {}
    for rep in range(args.repeats):
        order = ("fp32", "bf16") if rep % 2 == 0 else ("bf16", "fp32")
        for name in order:
            grads[(name, rep)], seconds = estimate(name, 100 + rep)
            if rep:
                wall[name].append(seconds / args.n)
        print(f"repeat {rep}{' (warm-up)' if rep == 0 else ''}: done", flush=True)
    ratios = [a / b for a, b in zip(wall["fp32"], wall["bf16"])]
    print(f"\none gradient estimate: {args.policy}, t* = {args.t_star}, surrogate "
          f"{args.surrogate_steps} steps, EOT {args.eot}, {args.n} images, "
          f"{torch.get_num_threads()} torch threads, {len(ratios)} interleaved repeats")
    for name in ("fp32", "bf16"):
        print(f"  {name}: {statistics.median(wall[name]):.3f} s/image (median)")
    print(f"  fp32/bf16 wall time: {statistics.median(ratios):.2f} "
          f"(per repeat {min(ratios):.2f}-{max(ratios):.2f})")
    same = [_agreement(grads[("fp32", r)], grads[("bf16", r)]) for r in range(args.repeats)]
    other = [_agreement(grads[("fp32", r)], grads[("fp32", r + 1)])
             for r in range(args.repeats - 1)]
    for label, vals in (("bf16 vs fp32, same noise", same),
                        ("fp32 vs fp32, other noise", other)):
        cos = statistics.median(v[0] for v in vals)
        sign = statistics.median(v[1] for v in vals)
        print(f"  {label:27s}: median cosine {cos:.4f}, equal signs {100 * sign:.1f}%")


if __name__ == "__main__":
    main()
