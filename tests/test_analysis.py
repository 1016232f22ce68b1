"""Per-sample optimal-t analysis: fractions, the analytic Gaussian model, the analyze-t command."""

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ssni
from ssni.eval.analysis import analyze_t, right_only_above, right_only_below

sys.path.insert(0, str(Path(__file__).parent))
from _cli_helpers import tiny_sets, tiny_weights  # noqa: E402

GRID = [0.02, 0.05, 0.1, 0.2, 0.3]


def test_fractions_on_a_hand_made_map():
    t = [0.05, 0.1, 0.2]
    correct = torch.tensor(
        [
            [1, 0, 0],  # right only below t* = 0.1
            [1, 1, 0],  # right at t* too
            [0, 0, 1],  # right only above t*
            [0, 1, 1],  # right at t*
            [0, 0, 0],  # never right
        ],
        dtype=torch.bool,
    )
    assert right_only_below(correct, t, 0.1) == pytest.approx(1 / 5)
    assert right_only_above(correct, t, 0.1) == pytest.approx(1 / 5)
    with pytest.raises(ValueError):
        right_only_below(correct, [0.1, 0.05, 0.2], 0.1)


class MeanThreshold(nn.Module):
    """Class 1 iff the mean model-space pixel exceeds ``theta``."""

    def __init__(self, theta: float) -> None:
        super().__init__()
        self.theta = theta

    def forward(self, x):
        p = (2 * x - 1).flatten(1).mean(1)
        return torch.stack([torch.zeros_like(p), 400.0 * (p - self.theta)], dim=1)


def _kappa(t: float, s: float) -> float:
    """Shrinkage of the input by noising to t and integrating the exact probability-flow ODE
    back to 0 for data N(0, s^2 I): x_0 = x_t s / sqrt(a s^2 + 1 - a), so the mean pixel
    becomes kappa(t) p with kappa = s sqrt(a) / sqrt(a s^2 + 1 - a), up to noise."""
    a = math.exp(-0.1 * t - 9.95 * t * t)
    return s * math.sqrt(a) / math.sqrt(a * s * s + 1 - a)


def _images(means, seed):
    g = torch.Generator().manual_seed(seed)
    noise = 0.05 * torch.randn(len(means), 1, 64, 64, generator=g)
    noise = noise - noise.mean(dim=(1, 2, 3), keepdim=True)  # pixel mean exactly p
    x_model = torch.tensor(means, dtype=torch.float32)[:, None, None, None] + noise
    return ((x_model + 1) / 2).clamp(0, 1)


def _means_away_from_boundaries(lo, hi, count, theta, s):
    bounds = [theta / _kappa(t, s) for t in GRID]
    out = []
    for p in torch.linspace(lo, hi, 4 * count).tolist():
        if all(abs(p - b) > 0.1 * b for b in bounds):
            out.append(p)
    step = max(1, len(out) // count)
    return out[::step][:count]


def test_fractions_match_the_analytic_gaussian_model():
    s, theta, t_star = 0.2, 0.15, 0.1
    model = ssni.GaussianScore(mean=0.0, std=s)
    purifier = ssni.DiffPure(model, rule="ddim")  # exact PF-ODE up to discretisation
    classifier = MeanThreshold(theta)
    over = _means_away_from_boundaries(0.16, 0.8, 20, theta, s)  # above theta
    under = [-0.5 + 0.03 * i for i in range(len(over))]  # well below theta
    y = torch.tensor([1] * len(over) + [0] * len(under))
    x = _images(over + under, seed=0)
    # adversarial: class-1 images pushed below theta, class-0 images pushed above it
    x_adv = _images([theta - 0.1] * len(over) + over, seed=1)
    policy = ssni.SSNI(model, t_star=t_star, probe_levels=5)
    policy = policy.fit([x], torch.Generator().manual_seed(0))
    res = analyze_t(purifier, classifier, x, y, GRID, t_star, x_adv=x_adv, policy=policy,
                    batch_size=64, generator=torch.Generator().manual_seed(0))

    def expected(means, labels):
        k = torch.tensor([_kappa(t, s) for t in GRID])
        return (torch.tensor(means)[:, None] * k[None, :] > theta) == (labels[:, None] == 1)

    exp_clean = expected(over + under, y)
    exp_adv = expected([theta - 0.1] * len(over) + over, y)
    assert (res.clean_correct != exp_clean).sum() <= 2
    assert (res.adv_correct != exp_adv).sum() <= 2
    fr = res.fractions()
    n = len(y)
    assert fr["clean_right_only_below_t_star"] == pytest.approx(
        right_only_below(exp_clean, GRID, t_star), abs=1.5 / n
    )
    assert fr["adv_right_only_above_t_star"] == pytest.approx(
        right_only_above(exp_adv, GRID, t_star), abs=1.5 / n
    )
    # the model produces both effects of the paper's motivation
    assert right_only_below(exp_clean, GRID, t_star) > 0.05
    assert right_only_above(exp_adv, GRID, t_star) > 0.05
    assert res.clean_t.shape == (n,) and res.adv_t.shape == (n,)
    assert float(res.clean_t.max()) <= t_star + 1e-9


def test_analyze_t_command_writes_its_figure(tmp_path, fashion_mnist):
    from ssni.cli.main import main

    s, c = tiny_weights(tmp_path)
    rc = main(["--quiet", "analyze-t", "--preset", "fmnist-diffpure-constant-pgd-linf",
               *tiny_sets(s, c), "--out", str(tmp_path / "t")])
    assert rc == 0
    for name in ("t_map.png", "accuracy_vs_t.png", "analysis.json", "config.toml"):
        assert (tmp_path / "t" / name).is_file()
    assert (tmp_path / "t" / "t_map.png").read_bytes()[:4] == b"\x89PNG"
