"""Soak test: an `ssni evaluate` of 64 images killed with SIGKILL at 3 random points, every
restart raced by a second run on the same folder, ends with the uninterrupted run's report.

Tiny stand-in weights on scikit-learn's 8x8 digits keep it to seconds of compute; the kill points
are drawn from ``SSNI_SOAK_SEED`` (random when unset; printed on failure).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _cli_helpers import tiny_sets, tiny_weights  # noqa: E402

N, SEEDS = 64, (121, 122)
TOTAL = N * len(SEEDS)
# Timing fields: the only report entries that may differ between two identical runs.
TIMING = ("seconds",)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(HERE.parent / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _args(weights, out):
    sets = tiny_sets(*weights, dataset="digits", score_model="file", classifier="file",
                     n=N, seeds=",".join(map(str, SEEDS)), batch_size=4, stats_n=16,
                     iterations=4, eot=2, purify_steps=4, surrogate_steps=2)
    return [sys.executable, "-m", "ssni", "--quiet", "evaluate",
            "--preset", "fmnist-diffpure-ssni-n-pgd-linf", *sets, "--out", str(out)]


def _samples(log):
    if not log.exists():
        return 0
    return sum(b'"kind": "sample"' in line for line in log.read_bytes().split(b"\n"))


def _start_pair(cmd):
    """Two runs started together on one folder; returns them once one has lost the race."""
    procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    return procs


def _loser(procs, out, deadline):
    """Wait until one run of the pair exits; it must be the one refused by the lock."""
    while all(p.poll() is None for p in procs):
        assert time.time() < deadline, "neither run of the pair was refused"
        time.sleep(0.01)
    lost = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not lost)
    _, err = lost.communicate()
    err = err.decode().strip()
    assert lost.returncode == 1, err
    assert len(err.splitlines()) == 1 and str(out) in err and f"pid {winner.pid}" in err, err
    return winner


def _report(out):
    doc = json.loads((out / "report.json").read_text())
    for key in TIMING:
        doc.get("extra", {}).pop(key, None)
    return doc


def _log_samples(log):
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return {(r["seed"], r["index"]): r["record"] for r in lines if r["kind"] == "sample"}


def test_killed_and_raced_evaluation_ends_with_the_uninterrupted_report(tmp_path):
    seed = int(os.environ.get("SSNI_SOAK_SEED") or random.SystemRandom().randrange(10**6))
    rng = random.Random(seed)
    note = f"(SSNI_SOAK_SEED={seed})"
    weights = tiny_weights(tmp_path)
    ref_out, out = tmp_path / "reference", tmp_path / "soak"
    reference = subprocess.Popen(_args(weights, ref_out), env=_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = out / "log.jsonl"
    points = sorted(rng.sample(range(1, TOTAL - 8), 3))
    deadline = time.time() + 600
    for point in points:
        winner = _loser(_start_pair(_args(weights, out)), out, deadline)
        while _samples(log) < point:
            assert winner.poll() is None, f"the run ended before sample {point} {note}"
            assert time.time() < deadline, note
            time.sleep(0.002)
        winner.send_signal(signal.SIGKILL)
        winner.wait()
        assert not (out / "report.json").exists(), note
    winner = _loser(_start_pair(_args(weights, out)), out, deadline)
    _, err = winner.communicate(timeout=600)
    assert winner.returncode == 0, err.decode() + note
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err.decode()

    assert _report(out) == _report(ref_out), note
    for name in ("report.md", "report.csv", "config.toml"):
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name + note
    lines = log.read_text().splitlines()
    keys = [(r["seed"], r["index"]) for r in map(json.loads, lines) if r["kind"] == "sample"]
    assert len(keys) == len(set(keys)) == TOTAL, note  # no duplicate, none missing
    assert _log_samples(log) == _log_samples(ref_out / "log.jsonl"), note
    assert not list(out.glob(".*lock")) and not list(out.glob("*.tmp")), note


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
