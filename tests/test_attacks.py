"""Attacks and gradient estimators (issue 4)."""

import pytest
import torch
from torch import nn

import ssni
from _digits import digits_test, trained_digits_mlp
from _models import TinyClassifier, gaussian_images, tiny_eps_model
from ssni.attacks import (
    APGD,
    EOT,
    PGD,
    ScoreNormLoss,
    Surrogate,
    ThreatModel,
    apgd_checkpoints,
    autoattack_rand,
    bpda,
    full,
    relaxed,
)
from ssni.attacks.losses import DLR, CrossEntropy

THREATS = [ThreatModel("Linf", 0.1), ThreatModel("L2", 0.8)]


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _ce_grad(model, x, y, generator=None):
    x = x.clone().requires_grad_(True)
    logits = model(x) if generator is None else model(x, generator=generator)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y, reduction="sum"), x)
    return g


def _defense(steps=4, checkpoint=False, policy=None, seed=0):
    score = tiny_eps_model(seed)
    purifier = ssni.DiffPure(score, reverse_steps=steps, checkpoint=checkpoint)
    return ssni.Defense(TinyClassifier(seed=seed), purifier, policy or ssni.Constant(0.1))


def _fitted_ssni(differentiable=False):
    score = tiny_eps_model(1)
    policy = ssni.SSNI(score, t_star=0.1, probe_levels=4, differentiable=differentiable)
    return policy.fit([gaussian_images(32, seed=5)], generator=_g(0))


# --- threat models ----------------------------------------------------------------------------
@pytest.mark.parametrize("threat", THREATS, ids=lambda t: t.norm)
def test_projection_and_random_start_stay_in_ball_and_box(threat):
    x = torch.rand(16, 1, 8, 8, generator=_g(0))
    far = x + 3.0 * torch.randn(16, 1, 8, 8, generator=_g(1))
    p = threat.project(far, x)
    assert threat.contains(p, x, tol=1e-6).all()
    assert (threat.distance(p, x) <= threat.eps + 1e-6).all()
    start = threat.random_start(x, _g(2))
    assert threat.contains(start, x, tol=1e-6).all()
    assert not torch.equal(start, x)
    inside = threat.project(x + 1e-3 * torch.randn(16, 1, 8, 8, generator=_g(3)), x)
    assert torch.allclose(threat.project(inside, x), inside)  # idempotent


class _Recorder(nn.Module):
    """Wraps a classifier and records every input it is evaluated on."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.inner(x)


@pytest.mark.parametrize("threat", THREATS, ids=lambda t: t.norm)
@pytest.mark.parametrize(
    "make", [lambda th: PGD(th, iterations=6, step_size=0.2, eot=1, random_start=True),
             lambda th: APGD(th, iterations=6, eot=1)],
    ids=["PGD", "APGD"],
)
def test_every_iterate_in_ball_and_box(threat, make):
    x, y = digits_test(24)
    model = _Recorder(trained_digits_mlp())
    x_adv = make(threat)(model, x, y, _g(0))
    assert len(model.seen) >= 6
    for xi in model.seen + [x_adv]:
        assert threat.contains(xi, x, tol=1e-6).all()


# --- gradient estimators ------------------------------------------------------------------------
def test_eot_one_is_plain_gradient_and_eot_n_is_mean_of_passes():
    d = _defense()
    x, y = gaussian_images(4, seed=1), torch.tensor([0, 1, 2, 3])
    est = EOT(1)(d, CrossEntropy(), x, y, _g(7))
    assert torch.equal(est.grad, _ce_grad(d, x, y, _g(7)))
    gen = _g(8)
    manual = sum(_ce_grad(d, x, y, gen) for _ in range(3)) / 3
    seq = EOT(3, batched=False)(d, CrossEntropy(), x, y, _g(8))
    assert torch.allclose(seq.grad, manual, atol=1e-7)


def test_bpda_gradient_is_classifier_gradient_at_purified_point():
    d = _defense()
    x, y = gaussian_images(4, seed=2), torch.tensor([1, 2, 3, 4])
    grad = EOT(1)(bpda(d), CrossEntropy(), x, y, _g(3)).grad
    with torch.no_grad():
        purified = d.purify(x, generator=_g(3))
    assert torch.allclose(grad, _ce_grad(d.classifier, purified, y), atol=1e-7)
    assert not torch.allclose(grad, _ce_grad(d, x, y, _g(3)), atol=1e-4)  # not the full gradient


def test_full_gradient_with_checkpointing_equals_plain_autograd():
    plain = _defense(steps=6)
    ckpt = full(plain)
    assert ckpt.purifier.checkpoint and not plain.purifier.checkpoint
    x, y = gaussian_images(3, seed=3), torch.tensor([0, 5, 9])
    g_plain = _ce_grad(plain, x, y, _g(11))
    g_ckpt = _ce_grad(ckpt, x, y, _g(11))
    assert g_plain.abs().max() > 0
    assert torch.allclose(g_ckpt, g_plain, atol=1e-5, rtol=0)


def test_surrogate_gradients_from_surrogate_losses_from_real_model():
    real, cheap = _defense(steps=6), _defense(steps=2)
    x, y = gaussian_images(4, seed=4), torch.tensor([0, 1, 2, 3])
    est = Surrogate(cheap, n=1)(real, CrossEntropy(), x, y, _g(5))
    assert torch.equal(est.grad, _ce_grad(cheap, x, y, _g(5)))
    gen = _g(5)
    _ce_grad(cheap, x, y, gen)  # the surrogate pass consumed the generator first
    with torch.no_grad():
        expected = nn.functional.cross_entropy(real(x, generator=gen), y, reduction="none")
    assert torch.allclose(est.loss, expected)


# --- attacks break an undefended classifier -------------------------------------------------
@pytest.mark.parametrize(
    "name,make",
    [
        ("PGD-Linf", lambda: PGD(ThreatModel("Linf", 0.2), iterations=20, step_size=0.05, eot=1)),
        ("PGD-L2", lambda: PGD(ThreatModel("L2", 1.0), iterations=20, step_size=0.25, eot=1)),
        ("APGD-CE-Linf", lambda: APGD(ThreatModel("Linf", 0.2), iterations=20, eot=1)),
        ("APGD-DLR-Linf", lambda: APGD(ThreatModel("Linf", 0.2), loss="dlr", iterations=20, eot=1)),
        ("APGD-CE-L2", lambda: APGD(ThreatModel("L2", 1.0), iterations=20, eot=1)),
        (
            "AutoAttack-rand",
            lambda: autoattack_rand(ThreatModel("Linf", 0.2), iterations=20, eot=1),
        ),
    ],
)
def test_attacks_break_undefended_classifier(name, make):
    model = trained_digits_mlp()
    x, y = digits_test()
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean()
    assert clean >= 0.9
    attack = make()
    x_adv = attack(model, x, y, _g(0))
    assert attack.threat.contains(x_adv, x, tol=1e-6).all()
    with torch.no_grad():
        robust = (model(x_adv).argmax(1) == y).float().mean()
    assert robust <= 0.05, f"{name}: {robust:.3f}"
    assert attack.last_stats["nonfinite_grad"].sum() == 0


def test_apgd_checkpoints_follow_the_paper():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_dlr_loss_matches_definition():
    z = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, 1.0, 4.0]])
    y = torch.tensor([0, 3])
    expected = torch.tensor([-(3.0 - 2.0) / (3.0 - 1.0), -(4.0 - 5.0) / (5.0 - 1.0)])
    assert torch.allclose(DLR()(z, y), expected)


# --- attacks through the SSNI policy -------------------------------------------------------
def test_relaxed_policy_has_gradient_through_score_norm():
    policy = _fitted_ssni()
    x = gaussian_images(4, seed=6).requires_grad_(True)
    assert not policy(x, generator=_g(0)).requires_grad  # the reference probe is not differentiated
    d = ssni.Defense(TinyClassifier(), ssni.DiffPure(tiny_eps_model(2), reverse_steps=3), policy)
    soft = relaxed(d)
    assert soft.policy.differentiable and not d.policy.differentiable
    t = soft.policy(x, generator=_g(0))
    assert torch.allclose(t.detach(), policy(x.detach(), generator=_g(0)))  # same forward levels
    (g_t,) = torch.autograd.grad(t.sum(), x)
    assert torch.isfinite(g_t).all() and g_t.abs().sum() > 0
    y = torch.tensor([0, 1, 2, 3])
    g_relaxed = EOT(1)(soft, CrossEntropy(), x.detach(), y, _g(4)).grad
    g_reference = EOT(1)(d, CrossEntropy(), x.detach(), y, _g(4)).grad
    assert torch.isfinite(g_relaxed).all()
    assert not torch.allclose(g_relaxed, g_reference, atol=1e-6)


def test_score_norm_aware_loss_lowers_the_score_norm():
    policy = _fitted_ssni()
    model = TinyClassifier()
    x = gaussian_images(16, seed=7)
    y = torch.zeros(16, dtype=torch.long)
    threat = ThreatModel("Linf", 0.05)
    attack = PGD(threat, iterations=8, step_size=0.01, eot=1, loss=ScoreNormLoss(policy, lam=100.0))
    x_adv = attack(model, x, y, _g(0))
    with torch.no_grad():
        e_clean = policy.score_norm(x, generator=_g(1))
        e_adv = policy.score_norm(x_adv, generator=_g(1))
    assert e_adv.mean() < e_clean.mean()
