"""Gradient passes under autocast (``EOT(autocast=...)``, config ``attack_autocast``): cheaper
attack gradients that stay close to the fp32 ones, while the predictions that count stay fp32."""

import pytest
import torch
from torch import nn

import ssni
from _models import TinyClassifier, gaussian_images, tiny_eps_model
from ssni.attacks import EOT, Surrogate
from ssni.attacks.losses import CrossEntropy
from ssni.cli import build
from ssni.cli.config import ConfigError, RunConfig


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _defense(steps=3, seed=0):
    purifier = ssni.DiffPure(tiny_eps_model(seed), reverse_steps=steps)
    return ssni.Defense(TinyClassifier(seed=seed), purifier, ssni.Constant(0.1))


def test_bf16_eot_gradient_is_fp32_and_close_to_the_fp32_gradient():
    d = _defense()
    x, y = gaussian_images(6, seed=2), torch.tensor([1, 2, 3, 4, 5, 6])
    ref = EOT(4)(d, CrossEntropy(), x, y, _g(3))
    low = EOT(4, autocast=torch.bfloat16)(d, CrossEntropy(), x, y, _g(3))
    assert low.grad.dtype == torch.float32 and low.logits.dtype == torch.float32
    assert low.grad.abs().max() > 0
    assert not torch.equal(low.grad, ref.grad)  # the passes really ran in bf16
    cos = nn.functional.cosine_similarity(low.grad.flatten(1), ref.grad.flatten(1), dim=1)
    assert cos.min() > 0.98


def test_surrogate_autocast_leaves_the_judged_pass_in_fp32():
    d = _defense(steps=3)
    cheap = d.variant(purifier=ssni.DiffPure(d.purifier.model, reverse_steps=1))
    x, y = gaussian_images(4, seed=5), torch.tensor([0, 1, 2, 3])
    ref = Surrogate(cheap, n=2)(d, CrossEntropy(), x, y, _g(1))
    low = Surrogate(cheap, n=2, autocast=torch.bfloat16)(d, CrossEntropy(), x, y, _g(1))
    # same random stream, the real defense's pass outside autocast: bitwise the same logits
    assert torch.equal(low.logits, ref.logits)
    assert torch.equal(low.loss, ref.loss)
    assert not torch.equal(low.grad, ref.grad)


def test_autocast_is_recorded_in_the_estimator_config_only_when_set():
    assert "autocast" not in EOT(2).config()
    assert EOT(2, autocast=torch.bfloat16).config()["autocast"] == "bfloat16"
    assert Surrogate(_defense(), n=2, autocast=torch.bfloat16).config()["autocast"] == "bfloat16"
    with pytest.raises(ValueError, match="autocast"):
        EOT(2, autocast="bf16")


def test_config_key_selects_bf16_gradient_passes():
    cfg = RunConfig(dataset="digits", n=4, purify_steps=2, surrogate_steps=1, eot=2,
                    iterations=1)
    d = _defense()
    assert build.build_attack(cfg, d).attack.gradient.eot.autocast is None
    fast = build.build_attack(cfg.replace(attack_autocast="bf16"), d).attack.gradient
    assert fast.eot.autocast is torch.bfloat16
    with pytest.raises(ConfigError):
        cfg.replace(attack_autocast="fp8")
