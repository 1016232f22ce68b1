"""A tiny SSNI evaluation run as a subprocess by the kill-and-restart test.

Usage: ``python _evalkill_helper.py LOG_PATH REPORT_PATH``; the environment variable
``SLEEP_PER_CALL`` (seconds per classifier call, default 0) slows it down so that it can be killed
mid-run; it does not change any result.
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ssni  # noqa: E402
from _models import TinyClassifier, gaussian_images  # noqa: E402
from ssni.attacks import PGD, ThreatModel  # noqa: E402
from ssni.eval.protocol import evaluate  # noqa: E402

N_SAMPLES = 12
SEEDS = (5, 6)


class SlowClassifier(TinyClassifier):
    def forward(self, x):
        time.sleep(float(os.environ.get("SLEEP_PER_CALL", "0")))
        return super().forward(x)


def build():
    score = ssni.GaussianScore(mean=0.0, std=0.25)
    policy = ssni.SSNI(score, t_star=0.1, probe_levels=4)
    policy.fit([gaussian_images(32, seed=9)], generator=torch.Generator().manual_seed(0))
    defense = ssni.Defense(SlowClassifier(seed=3), ssni.DiffPure(score, reverse_steps=3), policy)
    data = (gaussian_images(N_SAMPLES, seed=1), torch.arange(N_SAMPLES) % 10)
    attack = PGD(ThreatModel("Linf", 0.05), iterations=3, step_size=0.02, eot=2)
    return defense, attack, data


def run(log_path, report_path=None):
    defense, attack, data = build()
    report = evaluate(
        defense, attack, data, seeds=SEEDS, votes=3, worst_of=3, batch_size=2,
        log_path=log_path, sanity_samples=4,
    )
    if report_path is not None:
        report.to_json(report_path)
    return report


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
