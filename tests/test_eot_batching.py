"""Batched EOT, one t(x) per gradient estimate, probe chunking and network-call counts."""

import pytest
import torch
from torch import nn

import ssni
from _models import TinyClassifier, gaussian_images, tiny_eps_model
from ssni.attacks import EOT, PGD, Surrogate, ThreatModel, relaxed
from ssni.attacks.losses import CrossEntropy
from ssni.core.policies import eps_score_norm


def _g(seed):
    return torch.Generator().manual_seed(seed)


class NoisyModel(nn.Module):
    """Logits of ``x + 0.3 z`` (one draw of ``z`` per call, shape of ``x``): its random stream
    is the same for one call on ``n x B`` rows as for ``n`` calls on ``B`` rows."""

    def __init__(self) -> None:
        super().__init__()
        self.clf = TinyClassifier(seed=3)

    def forward(self, x, generator=None):
        z = torch.randn(x.shape, generator=generator)
        return self.clf(torch.tanh(3.0 * (x + 0.3 * z)))


def _defense(steps=3, policy=None, seed=0):
    score = tiny_eps_model(seed)
    purifier = ssni.DiffPure(score, reverse_steps=steps)
    return ssni.Defense(TinyClassifier(seed=seed), purifier, policy or ssni.Constant(0.1))


def _ssni(levels=4, differentiable=False):
    policy = ssni.SSNI(
        tiny_eps_model(1), t_star=0.1, probe_levels=levels, differentiable=differentiable
    )
    return policy.fit([gaussian_images(32, seed=5)], generator=_g(0))


@pytest.mark.parametrize("max_batch", [None, 8, 12])
def test_batched_eot_equals_sequential_with_the_same_random_stream(max_batch):
    model = NoisyModel()
    x, y = gaussian_images(4, seed=1), torch.tensor([0, 1, 2, 3])
    seq = EOT(5, batched=False)(model, CrossEntropy(), x, y, _g(7))
    bat = EOT(5, max_batch=max_batch)(model, CrossEntropy(), x, y, _g(7))
    assert seq.grad.abs().max() > 0
    assert torch.allclose(bat.grad, seq.grad, atol=1e-6, rtol=1e-5)
    assert torch.allclose(bat.loss, seq.loss, atol=1e-6)
    assert torch.allclose(bat.logits, seq.logits, atol=1e-6)


def test_batched_eot_on_a_defense_one_pass_per_call_is_the_sequential_path():
    d = _defense()
    x, y = gaussian_images(4, seed=2), torch.tensor([1, 2, 3, 4])
    seq = EOT(3, batched=False)(d, CrossEntropy(), x, y, _g(3))
    one = EOT(3, max_batch=4)(d, CrossEntropy(), x, y, _g(3))
    assert torch.equal(one.grad, seq.grad)


def test_batched_eot_on_a_defense_has_the_sequential_expectation():
    d = _defense(steps=2)
    x, y = gaussian_images(2, seed=4), torch.tensor([3, 7])
    seq = EOT(300, batched=False)(d, CrossEntropy(), x, y, _g(1)).grad
    bat = EOT(300)(d, CrossEntropy(), x, y, _g(2)).grad
    other = EOT(300, batched=False)(d, CrossEntropy(), x, y, _g(3)).grad
    # batched vs sequential differs no more than two sequential estimates with other seeds
    assert (bat - seq).norm() < 2.0 * (other - seq).norm() + 1e-8
    cos = nn.functional.cosine_similarity(bat.flatten(), seq.flatten(), dim=0)
    assert cos > 0.9


class RecordingPurifier(ssni.DiffPure):
    """DiffPure that records the levels of every call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def run(self, x, t, generator=None):
        self.seen.append(t.detach().clone())
        return super().run(x, t, generator=generator)


def test_shared_levels_probe_once_per_estimate_and_every_pass_uses_them():
    policy = _ssni(levels=4)
    purifier = RecordingPurifier(tiny_eps_model(0), reverse_steps=3)
    d = ssni.Defense(TinyClassifier(), purifier, policy)
    x, y = gaussian_images(4, seed=3), torch.tensor([0, 1, 2, 3])
    b, k, n, steps = 4, 4, 5, 3
    with ssni.count_network_calls(d) as shared:
        EOT(n, batched=False)(d, CrossEntropy(), x, y, _g(1))
    t_expected = policy(x, generator=_g(1))
    assert len(purifier.seen) == n
    assert all(torch.equal(t, t_expected) for t in purifier.seen)
    purifier.seen.clear()
    with ssni.count_network_calls(d) as per_pass:
        EOT(n, batched=False, share_levels=False)(d, CrossEntropy(), x, y, _g(1))
    steps_taken = steps * b * n
    assert shared.images == k * b + steps_taken
    assert per_pass.images == n * k * b + steps_taken
    # batched: the same probe once, the passes as one call per step
    with ssni.count_network_calls(d) as batched:
        EOT(n)(d, CrossEntropy(), x, y, _g(1))
    assert batched.images == k * b + steps_taken
    assert batched.calls == 1 + steps  # k*b = 16 rows is one probe call (chunk >= 64)


def test_surrogate_shares_levels_with_the_real_defense_loss_pass():
    policy = _ssni(levels=4)
    real = ssni.Defense(TinyClassifier(), ssni.DiffPure(tiny_eps_model(0), reverse_steps=6), policy)
    cheap = ssni.Defense(
        real.classifier, ssni.DiffPure(real.purifier.model, reverse_steps=2), policy
    )
    x, y = gaussian_images(4, seed=4), torch.tensor([0, 1, 2, 3])
    with ssni.count_network_calls(real, cheap) as calls:
        est = Surrogate(cheap, n=3)(real, CrossEntropy(), x, y, _g(5))
    assert est.loss.shape == (4,)
    # one probe (4 levels x 4 images), 3 surrogate passes of 2 steps, one real pass of 6 steps
    assert calls.images == 16 + 3 * 2 * 4 + 6 * 4


def test_relaxed_policy_keeps_its_per_pass_probe_and_gradient_through_t():
    d = relaxed(_defense(policy=_ssni(levels=4)))
    x, y = gaussian_images(4, seed=5), torch.tensor([0, 1, 2, 3])
    with ssni.count_network_calls(d) as calls:
        est = EOT(2)(d, CrossEntropy(), x, y, _g(1))
    assert calls.images == 2 * 4 * 4 + 2 * 3 * 4
    assert est.grad.abs().max() > 0


def test_probe_chunking_gives_the_same_norms_in_calls_of_the_chosen_size():
    model = tiny_eps_model(2)
    x = gaussian_images(16, seed=6)
    with ssni.count_network_calls(model) as one:
        e_one = eps_score_norm(model, x, probe_levels=10, generator=_g(4), chunk_size=0)
    with ssni.count_network_calls(model) as auto:
        e_auto = eps_score_norm(model, x, probe_levels=10, generator=_g(4))
    assert one.calls == 1 and one.images == 160
    assert auto.calls == 3 and auto.images == 160  # chunks of 64 images (4 levels of 16)
    assert torch.allclose(e_auto, e_one, rtol=1e-5, atol=1e-6)


def test_counting_restores_the_model_and_nests():
    model = tiny_eps_model(0)
    x, t = torch.zeros(2, 1, 8, 8), torch.full((2,), 0.1)
    with ssni.count_network_calls(model) as outer:
        with ssni.count_network_calls(model) as inner:
            model.eps(x, t)
        model.eps(x, t)
    assert (outer.calls, inner.calls) == (2, 1)
    assert "eps" not in model.__dict__


def test_defense_with_given_levels_skips_the_policy():
    d = _defense(policy=_ssni())
    x = gaussian_images(3, seed=7)
    t = torch.tensor([0.0, 0.05, 0.1])
    with ssni.count_network_calls(d) as calls:
        out = d.run(x, generator=_g(0), t=t)
    assert torch.equal(out.t, t)
    assert calls.images == 3 + 3  # steps=3 for the two samples with t > 0, no probe
    with pytest.raises(ValueError, match="shape"):
        d(x, t=torch.zeros(2))


def test_report_counts_network_evaluations_per_iteration():
    d = _defense(steps=3)
    x, y = gaussian_images(4, seed=8), torch.tensor([0, 1, 2, 3])
    attack = PGD(ThreatModel("Linf", 0.1), iterations=2, step_size=0.05, eot=2)
    report = ssni.evaluate(d, attack, (x, y), seeds=[1], batch_size=4, sanity_checks=False)
    # PGD needs no loss pass: 2 EOT passes x 3 reverse steps per iteration
    assert report.network_evals_per_iteration == pytest.approx(6.0)
    assert all(r["attack_network_evals"] == pytest.approx(12.0) for r in report.records)
    assert "6.0 network evaluations per image per iteration" in report.summary()


def test_accelerate_switch_leaves_cpu_output_unchanged():
    plain = tiny_eps_model(3)
    fast = tiny_eps_model(3)
    fast.accelerate = True
    x = gaussian_images(4, seed=9) * 2 - 1
    t = torch.tensor([0.01, 0.1, 0.3, 0.9])
    assert torch.equal(fast.eps(x, t), plain.eps(x, t))
    img = gaussian_images(4, seed=9)
    purify = [
        ssni.DiffPure(m, reverse_steps=4)(img, torch.full((4,), 0.2), generator=_g(2))
        for m in (plain, fast)
    ]
    assert torch.equal(purify[0], purify[1])
    assert fast._compiled is None  # nothing compiled on CPU
    assert set(fast.state_dict()) == set(plain.state_dict())


def test_cli_allocator_setting_applies_in_process():
    import subprocess
    import sys

    code = "from ssni.cli.allocator import map_large_buffers as m; print(m())"
    env = {k: v for k, v in __import__("os").environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    expected = "True" if sys.platform.startswith("linux") else "False"
    assert out.stdout.strip() == expected, out.stderr


def test_cli_config_sets_the_eot_options():
    from ssni.cli import build
    from ssni.cli.config import RunConfig

    score = tiny_eps_model(0)
    d = _defense(policy=ssni.Constant(0.1))
    d.purifier.model = score
    cfg = RunConfig(dataset="digits", gradient="bpda", eot=4)
    est = build.build_attack(cfg, d).attack.gradient
    assert (est.batched, est.max_batch, est.share_levels) == (True, 64, True)
    cfg = cfg.replace(eot_batched=False, eot_max_batch=0, eot_share_t=False, gradient="surrogate")
    est = build.build_attack(cfg, d).attack.gradient
    assert (est.eot.batched, est.eot.max_batch, est.eot.share_levels) == (False, None, False)
