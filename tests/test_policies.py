"""Constant and SSNI noise-level policies (issue: core)."""

import pytest
import torch

import ssni
from _models import gaussian_images, tiny_eps_model

MODEL = ssni.GaussianScore(mean=0.0, std=0.25)


def _fitted(reweight="sigmoid", **kw):
    clean = gaussian_images(256, seed=1)
    policy = ssni.SSNI(MODEL, reweight=reweight, **kw)
    assert (
        policy.fit([clean[:128], (clean[128:], None)], generator=torch.Generator().manual_seed(0))
        is policy
    )
    return policy


def test_eps_probe_calls_whole_levels_of_at_least_64_images_or_one_call():
    from _models import CountingScore

    counting = CountingScore(MODEL)
    e = ssni.eps_score_norm(counting, gaussian_images(5), probe_levels=20, chunk_size=0)
    assert e.shape == (5,) and counting.calls == 1 and counting.rows == 100
    auto = CountingScore(MODEL)
    ssni.eps_score_norm(auto, gaussian_images(5), probe_levels=20)
    assert auto.calls == 2 and auto.rows == 100  # 13 levels of 5 images, then 7
    chunked = CountingScore(MODEL)
    ssni.eps_score_norm(chunked, gaussian_images(5), probe_levels=20, chunk_size=30)
    assert chunked.calls == 4 and chunked.rows == 100


def test_score_norm_is_reproducible_with_generator():
    policy = _fitted()
    x = gaussian_images(6)
    a = policy.score_norm(x, generator=torch.Generator().manual_seed(4))
    b = policy.score_norm(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


def test_off_data_inputs_have_larger_score_norm():
    policy = _fitted()
    clean = gaussian_images(128, seed=2)
    g = torch.Generator().manual_seed(3)
    noisy = (clean + 0.1 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    shifted = (clean + 8 / 255 * torch.sign(torch.randn(clean.shape, generator=g))).clamp(0, 1)
    e_clean = policy.score_norm(clean)
    assert policy.score_norm(noisy).mean() > e_clean.mean() + 3 * e_clean.std() / 128**0.5
    assert policy.score_norm(shifted).mean() > e_clean.mean()
    t_clean = policy(clean).mean()
    assert policy(noisy).mean() > t_clean


@pytest.mark.parametrize("reweight", ["sigmoid", "linear"])
def test_level_is_non_decreasing_in_norm(reweight):
    policy = _fitted(reweight, t_star=0.1, bias=0.02)
    stats = policy.statistics()
    e = torch.linspace(stats["min"] - 5, stats["max"] + 5, 200, dtype=torch.float64)
    t = policy.quantize(policy.level_from_norm(e))
    assert (t[1:] >= t[:-1]).all()
    assert t[-1] > t[0]


def test_ssni_n_range_and_clean_mean_level():
    policy = _fitted("sigmoid", t_star=0.1, bias=0.04)
    mu = policy.statistics()["mean"]
    e = torch.tensor([mu - 1e3, mu, mu + 1e3], dtype=torch.float64)
    t = policy.quantize(policy.level_from_norm(e))
    assert t.tolist() == pytest.approx([0.0, 0.07, 0.14])
    t_x = policy(gaussian_images(64, seed=7, std=0.5))
    assert t_x.min() >= 0 and t_x.max() <= 0.14 + 1e-9
    assert torch.allclose(t_x * 1000, torch.round(t_x * 1000), atol=1e-3)  # on the 1/1000 grid


def test_ssni_l_range():
    policy = _fitted("linear", t_star=0.1, bias=0.03)
    x = torch.cat([gaussian_images(32, seed=7), gaussian_images(32, seed=8, std=0.6)])
    t = policy(x)
    assert t.min() >= 0.03 - 1e-9 and t.max() <= 0.13 + 1e-9
    stats = policy.statistics()
    e = torch.tensor([stats["min"] - 1, stats["max"] + 1], dtype=torch.float64)
    assert policy.quantize(policy.level_from_norm(e)).tolist() == pytest.approx([0.03, 0.13])


def test_ssni_l_default_does_not_depend_on_batch():
    policy = _fitted("linear")
    e = policy.score_norm(gaussian_images(4, seed=9), generator=torch.Generator().manual_seed(0))
    # the same samples joined by one far-off sample: default levels unchanged
    e_far = torch.cat([e, e.max() + 100 * torch.ones(1, dtype=e.dtype)])
    assert torch.equal(policy.level_from_norm(e_far)[:4], policy.level_from_norm(e))
    # the reference's batch-joined min/max is opt-in and does depend on the batch
    joined = ssni.SSNI(MODEL, reweight="linear", batch_joined=True)
    joined.load_state_dict(policy.state_dict())
    assert not torch.equal(joined.level_from_norm(e_far)[:4], joined.level_from_norm(e))


def test_ssni_l_default_forward_batch_independent_with_fixed_probe():
    policy = _fitted("linear")
    x = gaussian_images(3, seed=11)
    other = gaussian_images(5, seed=12, std=0.9)
    t_batch = policy(torch.cat([x, other]), generator=torch.Generator().manual_seed(0))
    # recompute sample by sample with the same noise rows
    e = policy.score_norm(torch.cat([x, other]), generator=torch.Generator().manual_seed(0))
    for i in range(3):
        t_i = policy.quantize(policy.level_from_norm(e[i : i + 1]))
        assert t_i.item() == pytest.approx(t_batch[i].item())


def test_state_dict_round_trip():
    policy = _fitted("sigmoid", tau=1.5, bias=0.01)
    fresh = ssni.SSNI(MODEL, tau=1.5, bias=0.01)
    assert not fresh.fitted
    fresh.load_state_dict(policy.state_dict())
    assert fresh.fitted and fresh.statistics() == policy.statistics()
    x = gaussian_images(8, seed=5)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert torch.equal(fresh(x, generator=g()), policy(x, generator=g()))


def test_unfitted_policy_names_fit():
    policy = ssni.SSNI(MODEL)
    with pytest.raises(RuntimeError, match=r"fit\("):
        policy(gaussian_images(2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reweight": "cosine"}, "reweight"),
        ({"t_star": 0.0}, "t_star"),
        ({"tau": -1.0}, "tau"),
        ({"t_star": 0.9, "bias": 0.2}, "t_star \\+ bias"),
        ({"reweight": "linear", "bias": -0.01}, "bias"),
        ({"reweight": "sigmoid", "batch_joined": True}, "batch_joined"),
    ],
)
def test_bad_policy_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ssni.SSNI(MODEL, **kwargs)


def test_probe_has_no_graph_by_default_and_differentiable_mode_has_one():
    model = tiny_eps_model()
    clean = gaussian_images(16)
    x = gaussian_images(4, seed=3).requires_grad_(True)
    default = ssni.SSNI(model).fit([clean])
    assert not default(x).requires_grad
    relaxed = ssni.SSNI(model, differentiable=True).fit([clean])
    t = relaxed(x, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(t.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.allclose(t * 1000, torch.round(t.detach() * 1000), atol=1e-3)


def test_ssni_defense_end_to_end_per_sample_levels():
    from _models import TinyClassifier

    clean = gaussian_images(64)
    policy = ssni.SSNI(MODEL).fit([clean])
    defense = ssni.Defense(TinyClassifier(), ssni.DiffPure(MODEL, reverse_step_size=0.005), policy)
    x = torch.cat([gaussian_images(4, seed=4), gaussian_images(4, seed=5, std=0.7)])
    out = defense.run(x, generator=torch.Generator().manual_seed(0))
    assert out.t.shape == (8,) and len(set(out.t.tolist())) > 1
    expected = torch.ceil(out.t / 0.005 - 1e-3).clamp_min(0).long()
    assert out.nfe.tolist() == expected.tolist()
