"""Reverse process with per-sample start times (issue: core)."""

import pytest
import torch

import ssni
from _models import CountingScore, tiny_eps_model
from ssni.core.sampling import ddim_step, euler_maruyama_step, make_step_rule, reverse, step_counts

RULES = ["ddpm", "ddim", "sde"]


@pytest.mark.parametrize("rule", RULES)
def test_step_from_t_to_t_is_identity(rule):
    model = ssni.GaussianScore(mean=0.1, std=0.4)
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.05, 0.1, 0.2, 0.4, 0.7, 0.9], dtype=torch.float64)
    step = make_step_rule(rule)
    out = step(model.eps(x, t), x, t, t, model.schedule, torch.Generator().manual_seed(0))
    assert torch.allclose(out, x, atol=1e-8)


def _reference_loop(model, x_t, t0, n, eta, generator):
    """Batch-level loop at one shared start time (the scalar path)."""
    x = x_t
    for j in range(n):
        t = torch.full((x.shape[0],), t0 * (1 - j / n), dtype=x.dtype)
        s = torch.full((x.shape[0],), t0 * (1 - (j + 1) / n), dtype=x.dtype)
        x = ddim_step(model.eps(x, t), x, t, s, model.schedule, generator, eta=eta)
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_constant_per_sample_t_equals_scalar_path(eta):
    model = tiny_eps_model()
    x_t = torch.randn(5, 1, 8, 8)
    t = torch.full((5,), 0.1)
    rule = make_step_rule("ddim", eta)
    with torch.no_grad():
        ours = reverse(
            model, x_t, t, rule=rule, steps=7, generator=torch.Generator().manual_seed(3)
        )
        ref = _reference_loop(model, x_t, 0.1, 7, eta, torch.Generator().manual_seed(3))
    assert torch.allclose(ours.x, ref, atol=1e-6)
    assert ours.nfe.tolist() == [7] * 5


def test_batch_independence_deterministic():
    model = tiny_eps_model()
    x_t = torch.randn(6, 1, 8, 8)
    t = torch.tensor([0.0, 0.013, 0.05, 0.1, 0.2, 0.3])
    rule = make_step_rule("ddim")
    with torch.no_grad():
        batch = reverse(model, x_t, t, rule=rule, step_size=0.01)
        for i in range(6):
            alone = reverse(model, x_t[i : i + 1], t[i : i + 1], rule=rule, step_size=0.01)
            assert torch.allclose(batch.x[i], alone.x[0], atol=1e-5)
            assert batch.nfe[i] == alone.nfe[0]
        # a different batch composition does not change a sample's result either
        perm = torch.tensor([5, 3, 1, 0, 4, 2])
        shuffled = reverse(model, x_t[perm], t[perm], rule=rule, step_size=0.01)
    assert torch.allclose(shuffled.x, batch.x[perm], atol=1e-5)


def test_step_counts_modes():
    t = torch.tensor([0.0, 0.001, 0.1, 0.3, 0.15])
    assert step_counts(t, step_size=1e-3).tolist() == [0, 1, 100, 300, 150]
    assert step_counts(t, steps=20).tolist() == [0, 20, 20, 20, 20]
    assert step_counts(t, step_size=0.02).tolist() == [0, 1, 5, 15, 8]
    with pytest.raises(ValueError):
        step_counts(t, steps=3, step_size=0.1)


@pytest.mark.parametrize("rule", ["ddpm", "sde"])
def test_nfe_equals_steps_and_mixed_batch_is_cheaper(rule):
    inner = ssni.GaussianScore(mean=0.0, std=0.5)
    t = torch.tensor([0.02, 0.05, 0.1, 0.0])
    x_t = torch.randn(4, 1, 4, 4)
    counting = CountingScore(inner)
    out = reverse(counting, x_t, t, rule=make_step_rule(rule), step_size=0.005)
    assert out.nfe.tolist() == [4, 10, 20, 0]
    assert counting.rows == int(out.nfe.sum()) == 34
    assert torch.equal(out.x[3], x_t[3])  # t = 0: untouched
    const = CountingScore(inner)
    reverse(const, x_t, torch.full((4,), 0.1), rule=make_step_rule(rule), step_size=0.005)
    assert const.rows == 80 and counting.rows < const.rows
    assert counting.calls == const.calls == 20


@pytest.mark.parametrize("rule", ["ddpm", "ddim", "sde"])
def test_gaussian_purification_recovers_distribution(rule):
    m, s = 0.2, 0.3
    model = ssni.GaussianScore(mean=m, std=s)
    g = torch.Generator().manual_seed(0)
    n = 500  # 8000 pixel values: standard errors ~1 % of s, well inside the 5 % tolerance
    t = torch.full((n,), 0.3, dtype=torch.float64)
    # start from the exact marginal at t (noised data); DDPM's fixed posterior variance loses
    # variance with coarse steps (Bao et al. 2022), so use the 1/1000 grid of the paper
    data = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64) * s + m
    x_t, _ = model.schedule.perturb(data, t, generator=g)
    out = reverse(model, x_t, t, rule=make_step_rule(rule), step_size=0.001, generator=g).x
    assert abs(out.mean().item() - m) < 0.05 * m + 0.01
    assert abs(out.std().item() - s) < 0.05 * s


def test_gaussian_purification_pulls_off_data_inputs_back():
    m, s = 0.0, 0.25
    model = ssni.GaussianScore(mean=m, std=s)
    g = torch.Generator().manual_seed(1)
    n = 500  # 8000 pixel values: standard errors ~1 % of s, well inside the 5 % tolerance
    x0 = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64) * 0.6  # too wide
    t = torch.full((n,), 1.0, dtype=torch.float64)
    x_t, _ = model.schedule.perturb(x0, t, generator=g)
    out = reverse(model, x_t, t, step_size=0.001, generator=g).x
    assert abs(out.std().item() - s) < 0.05 * s
    assert abs(out.mean().item() - m) < 0.02


def test_step_rule_functions_are_exported():
    assert ssni.ddim_step is ddim_step and ssni.euler_maruyama_step is euler_maruyama_step
    with pytest.raises(ValueError, match="unknown step rule"):
        make_step_rule("heun")
