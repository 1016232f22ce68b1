"""Policy-aware attacks on SSNI, the worst case over attacks and the random-defense protocols."""

import numpy as np
import pytest
import torch

import ssni
from _models import CountingScore, TinyClassifier, gaussian_images, tiny_eps_model
from ssni.attacks import (
    PGD,
    Counted,
    NormPenaltyLoss,
    SampledLevels,
    Surrogate,
    ThreatModel,
    TwoPhase,
    at_levels,
    clean_norm_target,
    lower_norm,
)
from ssni.attacks.losses import CrossEntropy
from ssni.attacks.norm import normal_quantile
from ssni.eval.checks import SanityError, level_gradient_check, lower_norm_check
from ssni.eval.protocol import evaluate
from ssni.eval.worst import clean_query_control, protocol_accuracy, worst_of


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _policy(score=None, reweight="sigmoid"):
    score = score or tiny_eps_model(1)
    policy = ssni.SSNI(score, t_star=0.1, probe_levels=4, reweight=reweight)
    return policy.fit([gaussian_images(32, seed=5)], generator=_g(0))


def _defense(policy, steps=3, seed=0):
    purifier = ssni.DiffPure(policy.model, reverse_steps=steps)
    return ssni.Defense(TinyClassifier(seed=seed), purifier, policy)


# --- clean target and penalty loss ------------------------
def test_normal_quantile_matches_known_values():
    assert normal_quantile(0.5) == pytest.approx(0.0, abs=1e-9)
    assert normal_quantile(0.9) == pytest.approx(1.2815516, abs=1e-6)
    assert normal_quantile(0.1) == pytest.approx(-1.2815516, abs=1e-6)


def test_clean_norm_target_is_the_normal_quantile_within_clean_range():
    policy = _policy()
    s = policy.statistics()
    target = clean_norm_target(policy, 0.9)
    assert s["mean"] < target <= s["max"]
    assert target == pytest.approx(min(s["mean"] + 1.2815516 * s["std"], s["max"]), rel=1e-6)


def test_norm_penalty_is_base_loss_below_target_and_lower_above():
    policy = _policy()
    x = gaussian_images(8, seed=3)
    y = torch.arange(8) % 10
    logits = torch.randn(8, 10, generator=_g(0))
    base = CrossEntropy()(logits, y)
    e = policy.score_norm(x, generator=_g(1)).detach()
    above = NormPenaltyLoss(policy, target=float(e.min()) - 1.0, lam=2.0)
    below = NormPenaltyLoss(policy, target=float(e.max()) + 1.0, lam=2.0)
    assert torch.allclose(below(logits, y, x, _g(1)), base)
    pen = above(logits, y, x, _g(1))
    assert (pen < base).all()
    assert torch.allclose(above.last_norm, e)


# --- constrained two-phase attack ------------------------
def test_lower_norm_descends_the_score_norm_of_a_gaussian_model():
    # analytic score: e(x) grows with the distance of x from the data mean, so descent works
    score = ssni.GaussianScore(mean=0.0, std=0.3)
    policy = _policy(score)
    x = gaussian_images(8, mean=0.6, std=0.1, seed=2)  # far from the mean 0
    threat = ThreatModel("Linf", 0.2)
    g = _g(4)
    e0 = policy.score_norm(x, generator=_g(5))
    x_low, e_low, probes = lower_norm(policy, threat, x, x, steps=6, step=0.3, generator=g)
    assert probes == 7
    assert threat.contains(x_low, x).all()
    e1 = policy.score_norm(x_low, generator=_g(5))
    assert (e1 < e0).all()


def test_two_phase_stays_in_threat_model_and_records_norms():
    policy = _policy()
    defense = _defense(policy)
    x = gaussian_images(6, seed=7)
    y = torch.arange(6) % 10
    threat = ThreatModel("Linf", 0.1)
    attack = TwoPhase(threat, policy, norm_steps=2, steps=3, step_size=0.03, eot=1)
    x_adv = attack(defense, x, y, _g(0))
    assert threat.contains(x_adv, x).all()
    per = attack.last_stats["per_sample"]
    assert per["min_norm"].shape == (6,) and per["phase1_norm"].shape == (6,)
    assert (per["min_norm"] <= per["phase1_norm"] + 1e-6).all()
    assert attack.last_stats["iterations"] == 4  # steps + 1 gradient estimates
    assert attack.config()["target"] == pytest.approx(clean_norm_target(policy))


def test_two_phase_rejects_bad_arguments():
    policy = _policy()
    threat = ThreatModel("Linf", 0.1)
    with pytest.raises(ValueError):
        TwoPhase(threat, policy, direction="up")
    with pytest.raises(ValueError):
        TwoPhase(threat, policy, lam=0.01, lam_min=0.1)


def test_two_phase_beats_the_norm_of_plain_pgd_with_a_tight_target():
    # with the target at the clean 10th percentile the penalty must keep e(x) lower than PGD's
    score = ssni.GaussianScore(mean=0.0, std=0.3)
    policy = _policy(score)
    defense = _defense(policy)
    x = gaussian_images(8, seed=9)
    y = TinyClassifier(seed=0)(x).argmax(1)
    threat = ThreatModel("Linf", 0.1)
    pgd = PGD(threat, iterations=4, step_size=0.03, eot=1)
    two = TwoPhase(threat, policy, quantile=0.1, norm_steps=2, steps=4, step_size=0.03, eot=1)
    e_pgd = policy.score_norm(pgd(defense, x, y, _g(0)), generator=_g(1))
    e_two = policy.score_norm(two(defense, x, y, _g(0)), generator=_g(1))
    lower_norm_check(e_two.tolist(), e_pgd.tolist())
    with pytest.raises(SanityError):
        lower_norm_check(e_pgd.tolist(), e_two.tolist())


# --- clean-level transfer ------------------------
def test_sampled_levels_draw_only_given_levels_and_at_levels_keeps_the_rest():
    levels = [0.02, 0.05, 0.07]
    pol = SampledLevels(levels)
    t = pol(torch.rand(200, 1, 8, 8), generator=_g(0))
    assert set(np.round(t.numpy(), 6)) == set(np.round(np.float32(levels), 6))
    defense = _defense(_policy())
    moved = at_levels(defense, levels)
    assert moved.classifier is defense.classifier and moved.purifier is defense.purifier
    assert isinstance(moved.policy, SampledLevels)
    with pytest.raises(ValueError):
        SampledLevels([])
    with pytest.raises(ValueError):
        SampledLevels([1.5])


def test_clean_level_transfer_attack_judges_on_the_real_defense():
    policy = _policy()
    defense = _defense(policy)
    source = at_levels(_defense(policy, steps=2), [0.03, 0.04])
    attack = PGD(ThreatModel("Linf", 0.1), iterations=2, step_size=0.05, gradient=Surrogate(source))
    x = gaussian_images(4, seed=1)
    y = torch.zeros(4, dtype=torch.long)
    x_adv = attack(defense, x, y, _g(0))
    assert not torch.equal(x_adv, x)


# --- sanity checks ------------------------
def test_level_gradient_check_passes_and_fails_loudly():
    policy = _policy()
    norms = level_gradient_check(policy, gaussian_images(4, seed=2), _g(0))
    assert (norms > 0).any()
    assert policy.differentiable is False  # the check does not change the policy

    class Flat(ssni.ScoreModel):
        def eps(self, x, t):
            return torch.zeros_like(x)

    flat = ssni.SSNI(Flat(), t_star=0.1, probe_levels=2, tau=1.0)
    flat.set_statistics(torch.tensor([1.0, 2.0]))
    with pytest.raises(SanityError):
        level_gradient_check(flat, gaussian_images(2), _g(0))


# --- query tracking and network calls ------------------------
def test_tracking_records_success_at_any_iteration_and_counts_calls():
    score = CountingScore(tiny_eps_model(1))
    policy = _policy(score)
    defense = _defense(policy)
    x = gaussian_images(5, seed=4)
    y = torch.arange(5)
    attack = PGD(ThreatModel("Linf", 0.1), iterations=3, step_size=0.05, eot=1).tracking()
    assert attack.config()["track_queries"] is True
    assert "track_queries" not in PGD(ThreatModel("Linf", 0.1)).config()
    counted = Counted(attack, {"score": score.inner.net})
    score.rows = 0
    counted(defense, x, y, _g(0))
    stats = counted.last_stats
    assert stats["queries"] == 3
    assert stats["per_sample"]["fooled_any"].dtype == torch.bool
    assert stats["network_calls"]["score"] * 5 == score.rows > 0


def test_evaluate_records_tracked_statistics():
    policy = _policy()
    defense = _defense(policy)
    x = gaussian_images(4, seed=4)
    y = TinyClassifier(seed=0)(x).argmax(1)
    attack = TwoPhase(ThreatModel("Linf", 0.1), policy, norm_steps=1, steps=2, eot=1).tracking()
    report = evaluate(defense, attack, (x, y), seeds=[121], worst_of=2, batch_size=4,
                      sanity_checks=False)
    rec = report.records[0]
    assert {"fooled_any", "queries", "min_norm", "phase1_norm"} <= set(rec)
    assert rec["queries"] == 3


# --- protocols and worst case ------------------------
def _records(rng, seeds=(1, 2), n=20, tracked=True):
    out = []
    for s in seeds:
        for i in range(n):
            robust = bool(rng.random() < 0.6)
            rec = {"seed": s, "index": i, "clean_correct": True, "robust": robust,
                   "robust_worst": robust and bool(rng.random() < 0.8)}
            if tracked:
                rec["fooled_any"] = bool(rng.random() < 0.3)
            out.append(rec)
    return out


def test_worst_case_is_never_above_any_member():
    rng = np.random.default_rng(0)
    for _ in range(20):
        members = {f"a{k}": _records(rng) for k in range(3)}
        worst = worst_of(members)
        for protocol, stat in worst.items():
            for recs in members.values():
                member = protocol_accuracy(recs, protocol)
                assert all(w <= m + 1e-12 for w, m in zip(stat["per_seed"], member["per_seed"]))
                assert stat["mean"] <= member["mean"] + 1e-12


def test_protocol_order_and_missing_tracking():
    rng = np.random.default_rng(1)
    recs = _records(rng)
    one = protocol_accuracy(recs, "one-shot")["mean"]
    assert protocol_accuracy(recs, "worst-of-N")["mean"] <= one
    assert protocol_accuracy(recs, "any-iteration")["mean"] <= one
    assert protocol_accuracy(_records(rng, tracked=False), "any-iteration") is None
    with pytest.raises(ValueError):
        protocol_accuracy(recs, "best-of-N")


def test_worst_of_refuses_members_on_other_samples():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError):
        worst_of({"a": _records(rng, n=10), "b": _records(rng, n=12)})


def test_clean_query_control_falls_with_queries():
    defense = _defense(_policy())
    x = gaussian_images(8, seed=6)
    y = TinyClassifier(seed=0)(x).argmax(1)
    one = clean_query_control(defense, x, y, 1, seeds=[121], batch_size=8)
    many = clean_query_control(defense, x, y, 3, seeds=[121], batch_size=8)
    assert many["mean"] <= one["mean"]
    assert many["queries"] == 3


# --- selection by name from the configuration ------------------------
def test_policy_attacks_are_selected_by_name_from_the_config():
    from ssni.cli import build
    from ssni.cli.config import ConfigError, RunConfig

    policy = _policy()
    defense = _defense(policy)
    cfg = RunConfig(dataset="digits", policy="ssni-n", attack="constrained", gradient="bpda",
                    iterations=3, eps=0.1, norm_steps=1).replace()
    setup = build.build_attack(cfg, defense)
    assert isinstance(setup.attack, TwoPhase)
    assert setup.attack.steps == 3 and setup.attack.norm_steps == 1
    assert setup.attack.target == pytest.approx(clean_norm_target(policy, 0.9))
    with pytest.raises(ConfigError):
        RunConfig(attack="constrained", policy="constant").replace()
    with pytest.raises(ConfigError):
        build.build_attack(cfg, ssni.Defense(defense.classifier, defense.purifier,
                                             ssni.Constant(0.1)))
