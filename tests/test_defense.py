"""Purifiers, Defense and input checks (issue: core)."""

import pytest
import torch

import ssni
from _models import TinyClassifier, gaussian_images, tiny_eps_model


def _defense(rule, checkpoint, model=None):
    model = model or tiny_eps_model()
    purifier = ssni.DiffPure(model, rule=rule, reverse_step_size=0.01, checkpoint=checkpoint)
    return ssni.Defense(TinyClassifier(), purifier, ssni.Constant(0.05))


def _input_grad(defense, x, y, seed):
    x = x.clone().requires_grad_(True)
    logits = defense(x, generator=torch.Generator().manual_seed(seed))
    loss = torch.nn.functional.cross_entropy(logits, y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


@pytest.mark.parametrize("rule", ["ddpm", "sde"])
def test_defense_gradients_finite_nonzero_and_checkpoint_exact(rule):
    x = gaussian_images(4)
    y = torch.tensor([0, 1, 2, 3])
    plain = _input_grad(_defense(rule, False), x, y, seed=5)
    ckpt = _input_grad(_defense(rule, True), x, y, seed=5)
    for g in (plain, ckpt):
        assert torch.isfinite(g).all()
        assert g.abs().sum() > 0
    assert torch.allclose(plain, ckpt, atol=1e-5)


def test_gradients_with_mixed_per_sample_levels_have_no_nan():
    model = tiny_eps_model()
    purifier = ssni.DiffPure(model, reverse_step_size=0.01)
    x = gaussian_images(4).requires_grad_(True)
    t = torch.tensor([0.0, 0.02, 0.05, 0.1])
    out = purifier(x, t, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all()
    assert torch.allclose(grad[0], torch.ones_like(grad[0]))  # t = 0: identity
    assert (grad[1:].flatten(1).abs().sum(1) > 0).all()


def test_diffpure_outputs_images_and_reports_nfe():
    model = ssni.GaussianScore(mean=0.0, std=0.5)
    x = gaussian_images(3)
    out = ssni.DiffPure(model).run(x, torch.tensor([0.0, 0.01, 0.1]))
    assert out.x.shape == x.shape and out.x.min() >= 0 and out.x.max() <= 1
    assert out.nfe.tolist() == [0, 10, 100]
    assert torch.allclose(out.x[0], x[0], atol=1e-6)
    fixed = ssni.DiffPure(model, reverse_steps=5).run(x, torch.tensor([0.0, 0.01, 0.1]))
    assert fixed.nfe.tolist() == [0, 5, 5]


def test_diffpure_accepts_float_level_like_tensor():
    model = ssni.GaussianScore()
    x = gaussian_images(3)
    a = ssni.DiffPure(model, reverse_steps=3)(x, 0.05, generator=torch.Generator().manual_seed(1))
    b = ssni.DiffPure(model, reverse_steps=3)(
        x, torch.full((3,), 0.05), torch.Generator().manual_seed(1)
    )
    assert torch.equal(a, b)


def test_straight_through_gradient_is_identity():
    model = tiny_eps_model()
    purifier = ssni.StraightThrough(ssni.DiffPure(model, reverse_step_size=0.01))
    x = gaussian_images(2).requires_grad_(True)
    out = purifier(x, 0.05, generator=torch.Generator().manual_seed(0))
    w = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * w).sum(), x)
    assert torch.equal(grad, w)
    ref = ssni.DiffPure(model, reverse_step_size=0.01)(x, 0.05, torch.Generator().manual_seed(0))
    assert torch.allclose(out, ref)


def test_predict_majority_vote_and_determinism():
    defense = _defense("ddpm", False, model=ssni.GaussianScore(mean=0.0, std=0.5))
    x = gaussian_images(8)
    a = defense.predict(x, votes=3, generator=torch.Generator().manual_seed(0))
    b = defense.predict(x, votes=3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (8,) and torch.equal(a, b)
    with pytest.raises(ValueError, match="votes"):
        defense.predict(x, votes=0)


def test_defense_run_exposes_intermediates():
    defense = _defense("ddim", False)
    out = defense.run(gaussian_images(3))
    assert out.logits.shape == (3, 10)
    assert out.t.tolist() == pytest.approx([0.05] * 3)
    assert out.nfe.tolist() == [5, 5, 5]


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(3, 8, 8), "shape"),
        (torch.rand(2, 1, 8, 8) * 2, r"\[0, 1\]"),
        (torch.full((2, 1, 8, 8), float("nan")), "NaN"),
        (torch.randint(0, 2, (2, 1, 8, 8)), "floating"),
    ],
)
def test_bad_images_rejected(bad, message):
    model = ssni.GaussianScore()
    with pytest.raises(ValueError, match=message):
        ssni.DiffPure(model)(bad, 0.1)
    with pytest.raises(ValueError, match=message):
        ssni.Constant(0.1)(bad)


@pytest.mark.parametrize(
    "t", [torch.tensor([0.1, 1.5]), torch.tensor([-0.1, 0.1]), torch.tensor([0.1])]
)
def test_bad_levels_rejected(t):
    with pytest.raises(ValueError, match=r"t must"):
        ssni.DiffPure(ssni.GaussianScore())(torch.rand(2, 1, 4, 4), t)


def test_constant_policy_validates_t_star():
    with pytest.raises(ValueError, match="t_star"):
        ssni.Constant(0.0)
    with pytest.raises(ValueError, match="t_star"):
        ssni.Constant(1.5)
