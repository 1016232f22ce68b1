"""One home per concern: defense variants, the attack target, registries, shared helpers."""

import copy

import pytest
import torch

import ssni
from _models import TinyClassifier, gaussian_images, tiny_eps_model
from ssni.attacks import PGD, AttackTarget, ThreatModel, bpda, full, relaxed
from ssni.core.defense import majority_vote
from ssni.core.variants import variant


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _fitted_defense():
    policy = ssni.SSNI(tiny_eps_model(1), t_star=0.1, probe_levels=4)
    policy.fit([gaussian_images(32, seed=5)], generator=_g(0))
    return ssni.Defense(TinyClassifier(), ssni.DiffPure(tiny_eps_model(2), reverse_steps=3), policy)


def test_shallow_module_copy_shares_buffers_but_a_variant_does_not():
    # the old way (copy.copy of an nn.Module): converting the copy converted the original
    d = _fitted_defense()
    old = copy.copy(d.policy)
    old.differentiable = True
    old.double()
    assert d.policy.norm_mean.dtype == torch.float64
    # a variant owns its tables and buffers
    d = _fitted_defense()
    soft = relaxed(d)
    soft.policy.double()
    assert d.policy.norm_mean.dtype == torch.float32
    assert soft.policy.norm_mean.dtype == torch.float64
    assert soft.policy.differentiable and not d.policy.differentiable
    assert torch.equal(soft.policy.norm_mean.float(), d.policy.norm_mean)
    # sub-networks are shared, not copied
    assert soft.policy.model is d.policy.model and soft.classifier is d.classifier


def test_defense_variants_keep_the_original_settings():
    d = _fitted_defense()
    ck, st = full(d), bpda(d)
    assert ck.purifier.checkpoint and not d.purifier.checkpoint
    assert ck.purifier.model is d.purifier.model
    assert isinstance(st.purifier, ssni.StraightThrough) and st.purifier.purifier is d.purifier
    assert bpda(st).purifier is st.purifier  # not wrapped twice
    x = gaussian_images(3, seed=1)
    with torch.no_grad():
        assert torch.equal(ck(x, generator=_g(4)), d(x, generator=_g(4)))
    with pytest.raises(AttributeError, match="no setting"):
        variant(d.policy, no_such_setting=1)
    with pytest.raises(ValueError, match="differentiable"):
        relaxed(ssni.Defense(TinyClassifier(), d.purifier, ssni.Constant(0.1)))


def test_evaluate_takes_an_attack_target_like_a_surrogate():
    d = _fitted_defense()
    x, y = gaussian_images(4, seed=3), torch.tensor([0, 1, 2, 3])
    attack = PGD(ThreatModel("Linf", 0.05), iterations=2, step_size=0.02, eot=1)
    kw = dict(seeds=[1], batch_size=4, sanity_checks=False)
    by_target = ssni.evaluate(AttackTarget(d, bpda(d)), attack, (x, y), **kw)
    by_keyword = ssni.evaluate(d, attack, (x, y), surrogate=bpda(d), **kw)
    assert by_target.records == by_keyword.records
    assert by_target.config["surrogate"] is not None
    plain = AttackTarget.of(d)
    assert plain.gradient is d and not plain.distinct
    with pytest.raises(ValueError, match="either"):
        AttackTarget.of(plain, d)


def test_majority_vote_breaks_ties_towards_the_smallest_label():
    labels = torch.tensor([[2, 1, 0], [1, 1, 3], [2, 0, 3], [1, 0, 0]])
    assert majority_vote(labels, 4).tolist() == [1, 0, 0]


def test_one_dataset_registry():
    from ssni import data
    from ssni.io import zoo

    assert zoo.DATASETS is data.DATASETS
    assert data.dataset_entry("imagenet-val") is data.DATASETS["imagenet"]
    with pytest.raises(KeyError, match="fashion-mnist"):
        data.dataset_entry("no-such-data")
    with pytest.raises(ValueError, match="needs the folder"):
        data.sample_split("cifar10", "test", 4, 0)
    x, y = data.sample_split("digits", "val", 5, 0)
    x2, y2 = data.subset(*data.load_dataset("digits", "val"), 5, 0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="only 300"):
        data.sample_split("digits", "val", 301, 0)


@pytest.mark.parametrize(
    "make,old,new,value",
    [
        (lambda **kw: ssni.DiffPure(tiny_eps_model(), **kw), "steps", "reverse_steps", 3),
        (lambda **kw: ssni.DiffPure(tiny_eps_model(), **kw), "step_size", "reverse_step_size",
         0.01),
        (lambda **kw: ssni.GDMP(tiny_eps_model(), **kw), "steps", "reverse_steps", 2),
        (lambda **kw: ssni.GNS(tiny_eps_model(), **kw), "steps", "reverse_steps", 2),
        (lambda **kw: PGD(ThreatModel("Linf", 0.1), **kw), "steps", "iterations", 7),
        (lambda **kw: ssni.APGD(ThreatModel("Linf", 0.1), **kw), "steps", "iterations", 7),
        (lambda **kw: ssni.SSNI(tiny_eps_model(), **kw), "levels", "probe_levels", 5),
    ],
)
def test_old_keywords_still_work_with_a_deprecation_warning(make, old, new, value):
    with pytest.warns(DeprecationWarning, match=f"{old}= is deprecated, use {new}="):
        obj = make(**{old: value})
    assert getattr(obj, new) == value and getattr(obj, old) == value
    assert repr(obj) == repr(make(**{new: value}))
    with pytest.raises(TypeError, match=f"give {new}= only"):
        make(**{old: value, new: value})


def test_old_keyword_of_functions_still_works():
    x = gaussian_images(2, seed=1)
    with pytest.warns(DeprecationWarning, match="levels= is deprecated"):
        a = ssni.eps_score_norm(tiny_eps_model(), x, levels=3, generator=_g(0))
    b = ssni.eps_score_norm(tiny_eps_model(), x, probe_levels=3, generator=_g(0))
    assert torch.equal(a, b)
    with pytest.warns(DeprecationWarning, match="steps= is deprecated"):
        chain = ssni.autoattack_rand(ThreatModel("Linf", 0.1), steps=4)
    assert [a.iterations for a in chain.attacks] == [4, 4]
