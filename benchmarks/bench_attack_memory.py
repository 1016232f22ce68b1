"""Peak memory of the full-gradient attack (exact backprop through every reverse step).

Each setting runs in its own fresh subprocess so peaks are independent. A setting builds a DDPM
UNet on 28x28 grey images (Fashion-MNIST size) with DiffPure at a given number of reverse steps,
takes one PGD iteration with the exact gradient (EOT 1) on a batch, and reports the process's
resident-set high-water mark (``resource.getrusage``) and its increase over the resident set just
before the attack (the memory the attack itself needed). Checkpointed network calls
(``DiffPure(checkpoint=True)``, i.e. ``ssni.attacks.full``) should keep the attack's memory flat
in the number of steps; plain autograd is shown for contrast.

The resident set measures what the C allocator holds, not what tensors hold. With glibc's default
dynamic mmap threshold, freed activation buffers are recycled inside the heap and stay resident
behind small long-lived tensors (the few per-step tensors the reverse process keeps for backward),
so the high-water mark grows with the number of steps although live memory does not. The CLI
therefore fixes the mmap threshold for its own process when it runs a full-gradient attack
(``ssni.cli.allocator.map_large_buffers``, what ``MALLOC_MMAP_THRESHOLD_=65536`` does: large
buffers are mapped and unmapped on free, so the resident set follows live memory). Rows: the
checkpointed attack started with glibc's default allocator settings and the CLI's in-process
setting (what ``ssni evaluate`` does), with the environment variable, and with the default
allocator left alone (for contrast); plain autograd for contrast.

Usage: ``python benchmarks/bench_attack_memory.py [--batch 8] [--steps 10 100] [--no-plain]
[--no-default-malloc]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_now_kib() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() // 1024


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def run_setting(steps: int, checkpoint: bool, batch: int, cli_allocator: bool = False) -> dict:
    import torch

    if cli_allocator:
        from ssni.cli.allocator import map_large_buffers

        if not map_large_buffers():
            raise RuntimeError("could not set the mmap threshold in-process")

    import ssni
    from ssni.attacks import PGD, ThreatModel
    from ssni.nets.unet import UNet

    torch.manual_seed(0)
    net = UNet(in_channels=1, base_channels=32, channel_mults=(1, 2, 2), attn_levels=(2,))
    score = ssni.EpsilonNetwork(net, time_scale=1000.0)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    purifier = ssni.DiffPure(score, reverse_steps=steps, checkpoint=checkpoint)
    defense = ssni.Defense(classifier, purifier, ssni.Constant(0.1))
    for p in defense.parameters():
        p.requires_grad_(False)
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.arange(batch) % 10
    attack = PGD(ThreatModel("Linf", 8 / 255), iterations=1, eot=1)
    with torch.no_grad():  # warm-up: allocator pools and kernels, no graph
        defense(x, generator=torch.Generator().manual_seed(2))
    before = _rss_now_kib()
    start = time.perf_counter()
    attack(defense, x, y, torch.Generator().manual_seed(3))
    seconds = time.perf_counter() - start
    peak = _peak_kib()
    return {
        "steps": steps,
        "checkpoint": checkpoint,
        "batch": batch,
        "peak_rss_mib": peak / 1024,
        "attack_mib": max(peak - before, 0) / 1024,
        "seconds": seconds,
    }


def _spawn(steps: int, checkpoint: bool, batch: int, alloc: str) -> dict:
    cmd = [
        sys.executable, __file__, "--child", str(steps), str(int(checkpoint)), str(batch),
        str(int(alloc == "cli")),
    ]
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if alloc == "env":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        steps, ckpt, batch = int(sys.argv[2]), bool(int(sys.argv[3])), int(sys.argv[4])
        print(json.dumps(run_setting(steps, ckpt, batch, bool(int(sys.argv[5])))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, nargs=2, default=[10, 100])
    parser.add_argument("--no-plain", action="store_true", help="skip plain autograd")
    parser.add_argument(
        "--no-default-malloc", action="store_true", help="skip the default-allocator run"
    )
    args = parser.parse_args()
    modes = [(True, "cli"), (True, "env")]
    if not args.no_default_malloc:
        modes.append((True, "default"))
    if not args.no_plain:
        modes.append((False, "env"))
    names = {
        "cli": "default glibc allocator + the CLI's in-process setting (ssni evaluate)",
        "env": "MALLOC_MMAP_THRESHOLD_=65536",
        "default": "default glibc allocator, left alone",
    }
    for ckpt, alloc in modes:
        rows = [_spawn(s, ckpt, args.batch, alloc) for s in args.steps]
        label = "full gradient, checkpointed" if ckpt else "plain autograd (no checkpoint)"
        print(f"{label}, batch {args.batch}, {names[alloc]}:")
        for r in rows:
            print(
                f"  {r['steps']:4d} reverse steps: peak RSS {r['peak_rss_mib']:8.1f} MiB, "
                f"attack {r['attack_mib']:8.1f} MiB, {r['seconds']:6.1f} s"
            )
        a, b = rows
        print(
            f"  ratio {b['steps']}/{a['steps']} steps: peak RSS "
            f"{b['peak_rss_mib'] / a['peak_rss_mib']:.2f}, attack memory "
            f"{b['attack_mib'] / max(a['attack_mib'], 1e-9):.2f}"
        )


if __name__ == "__main__":
    main()
