"""Configuration -> objects: the attack branches no preset exercises (gradient=full|bpda,
adaptive t), built and run directly."""

import sys
from pathlib import Path

import pytest
import torch

import ssni
from ssni.attacks import EOT, Surrogate
from ssni.cli import build
from ssni.cli.config import RunConfig

sys.path.insert(0, str(Path(__file__).parent))
from _cli_helpers import tiny_weights  # noqa: E402


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    s, c = tiny_weights(tmp_path_factory.mktemp("w"))
    cfg = RunConfig(dataset="fashion-mnist", score_model="file", score_model_path=str(s),
                    classifier="file", classifier_path=str(c), policy="ssni-n", levels=2,
                    purify_steps=2, surrogate_steps=1, iterations=2, eot=1, eps=0.1,
                    step_size=0.05)
    model, classifier = build.build_score_model(cfg), build.build_classifier(cfg)
    stats = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    policy = build.build_policy(cfg, model, stats_images=stats,
                                generator=torch.Generator().manual_seed(1))
    return cfg, build.build_defense(cfg, model, classifier, policy)


def _attack_once(setup):
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1])
    x_adv = setup.attack(setup.target.gradient, x, y, torch.Generator().manual_seed(3))
    assert setup.attack.threat.contains(x_adv, x, tol=1e-6).all()
    assert int(setup.attack.last_stats["zero_grad"].sum()) == 0  # gradients reach the input
    assert not torch.equal(x_adv, x)


@pytest.mark.parametrize("gradient", ["full", "bpda"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_full_and_bpda_branches(parts, gradient, adaptive):
    cfg, defense = parts
    setup = build.build_attack(cfg.replace(gradient=gradient, adaptive_t=adaptive), defense)
    target = setup.target
    assert target.judged is defense and target.distinct
    assert isinstance(setup.attack.gradient, EOT)
    if gradient == "full":
        assert target.gradient.purifier.checkpoint and not defense.purifier.checkpoint
        assert target.gradient.purifier.model is defense.purifier.model
    else:
        assert isinstance(target.gradient.purifier, ssni.StraightThrough)
    assert target.gradient.policy.differentiable is adaptive
    assert not defense.policy.differentiable
    assert ("adaptive t(x)" in setup.description) is adaptive
    _attack_once(setup)


@pytest.mark.parametrize("adaptive", [False, True])
def test_surrogate_branch(parts, adaptive):
    cfg, defense = parts
    setup = build.build_attack(cfg.replace(adaptive_t=adaptive), defense)
    assert setup.target.gradient is defense and not setup.target.distinct
    estimator = setup.attack.gradient
    assert isinstance(estimator, Surrogate)
    assert estimator.model.purifier.reverse_steps == cfg.surrogate_steps
    assert estimator.model.policy.differentiable is adaptive
    assert not defense.policy.differentiable
    _attack_once(setup)


def test_adaptive_t_needs_an_ssni_policy(parts):
    cfg, defense = parts
    constant = defense.variant(policy=ssni.Constant(cfg.t_star))
    setup = build.build_attack(cfg.replace(gradient="bpda", adaptive_t=True), constant)
    assert "adaptive" not in setup.description
    assert not hasattr(setup.target.gradient.policy, "differentiable")
