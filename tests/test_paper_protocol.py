"""The paper's protocol, exactly: the reference's L2 step, the time labels of discrete
checkpoints, the reference's robust metric, the recorded t(x), and the presets that use them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ssni
from _models import TinyClassifier
from ssni.attacks import PGD, Attack, ThreatModel
from ssni.cli import config as config_mod


def _g(seed):
    return torch.Generator().manual_seed(seed)


# --- 1. PGD-L2 step -------------------------------------------------------------------------------
def _reference_l2_pgd(model, x, y, eps, step, steps):
    """The SSNI reference code's L2 PGD (after Lee & Kim), written out by hand: step
    ``step * sign(grad)``, scale the perturbation back onto the L2 ball, clip to [0, 1]."""
    x_adv = x.clone()
    for _ in range(steps):
        xi = x_adv.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(xi), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xi)
        x_adv = x_adv + step * grad.sign()
        delta = x_adv - x
        norms = delta.reshape(x.shape[0], -1).norm(p=2, dim=1)
        factor = torch.minimum(eps / norms, torch.ones_like(norms))
        x_adv = (x + delta * factor.view(-1, 1, 1, 1)).clamp(0, 1)
    return x_adv


def test_pgd_l2_sign_step_equals_the_reference_update():
    model = TinyClassifier(pixels=3 * 8 * 8, seed=3).eval()
    x = torch.rand(6, 3, 8, 8, generator=_g(0)) * 0.8 + 0.1
    y = torch.arange(6) % 10
    threat = ThreatModel("L2", 0.5)
    ours = PGD(threat, steps=5, step_size=0.007 * 4, eot=1, l2_step="sign")(model, x, y)
    ref = _reference_l2_pgd(model, x, y, 0.5, 0.007 * 4, 5)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # 5 sign steps of 0.028 on 192 pixels reach the edge of the ball (0.028 * sqrt(192) = 0.39)
    assert (threat.distance(ours, x) > 0.49).all()
    # the textbook step moves 0.028 per step in L2 length: far from the edge, and not the same
    textbook = PGD(threat, steps=5, step_size=0.007 * 4, eot=1)(model, x, y)
    assert (threat.distance(textbook, x) <= 5 * 0.028 + 1e-5).all()
    assert PGD(threat).l2_step == "normalized"
    with pytest.raises(ValueError, match="l2_step"):
        PGD(threat, l2_step="unit")


def test_paper_l2_presets_use_the_reference_step():
    rows = [n for n in config_mod.list_presets() if n.startswith("cifar10") and n.endswith("l2")]
    assert len(rows) == 9
    for name in rows:
        cfg = config_mod.load_config(name)
        assert cfg.l2_step == "sign", name


# --- 3. time labels of discrete checkpoint families ------------------------------------------------
class LabelNet(nn.Module):
    """Returns the time label it was given in every output entry, and remembers the labels."""

    def __init__(self, out_channels: int = 3) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.out_channels = out_channels
        self.seen = []

    def forward(self, x, label):
        label = label.to(x.dtype)
        self.seen.append(label.detach().clone())
        b, _, h, w = x.shape
        return label.view(-1, 1, 1, 1).expand(b, self.out_channels, h, w) + 0 * self.anchor


def _registry_model(monkeypatch, tmp_path, name, out_channels):
    from ssni.io import zoo

    net = LabelNet(out_channels)
    monkeypatch.setattr(zoo, "build_network", lambda arch, cfg: net)
    path = tmp_path / "stand-in.pt"
    if zoo.SCORE_MODELS[name].format == "score_sde":
        shadow = [p.detach().clone() for p in net.parameters()]
        torch.save({"model": net.state_dict(), "ema": {"shadow_params": shadow}}, path)
    else:
        torch.save(net.state_dict(), path)
    return zoo.load_score_model(name, path), net


@pytest.mark.parametrize(
    "name,out_channels,expected",
    [
        # guided-diffusion: alpha_bar_k (t = k / 1000) was trained with the 0-based label k - 1
        ("imagenet-guided-256-uncond", 6, [99.0, 0.0, 19.0]),
        # score_sde's continuous DDPM++: 999 t
        ("cifar10-ddpmpp", 3, [99.9, 0.999, 19.98]),
    ],
)
def test_each_checkpoint_family_gets_its_training_label(
    monkeypatch, tmp_path, name, out_channels, expected
):
    model, net = _registry_model(monkeypatch, tmp_path, name, out_channels)
    x = torch.zeros(3, 3, 4, 4)
    t = torch.tensor([0.1, 0.001, 0.02])
    with torch.no_grad():
        out = model.eps(x, t)
    assert out.shape == x.shape
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor(expected), rtol=0, atol=1e-4)
    # the reverse process from t = 3 / 1000 calls the network at alpha_bar_3, _2, _1
    net.seen.clear()
    with torch.no_grad():
        ssni.reverse(model, x[:1], torch.tensor([0.003]), generator=_g(0))
    labels = [float(v) for v in torch.cat(net.seen)]
    want = [2.0, 1.0, 0.0] if name.startswith("imagenet") else [2.997, 1.998, 0.999]
    assert labels == pytest.approx(want, abs=1e-4)


def test_diffusers_unet_gets_zero_based_timesteps():
    from ssni.io.adapters import DiffusersUNet

    net = LabelNet(3)
    model = DiffusersUNet(net)
    with torch.no_grad():
        model.eps(torch.zeros(3, 3, 4, 4), torch.tensor([0.1, 0.001, 0.6]))
    assert net.seen[-1].tolist() == [99.0, 0.0, 599.0]


# --- 5. the reference's robust metric beside ours -----------------------------------------------
class _MeanBrightness(nn.Module):
    """Class 1 when the mean pixel exceeds 0.5, else class 0."""

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True) - 0.5
        return torch.cat([torch.zeros_like(m), 20.0 * m], dim=1)


class _Brighten(Attack):
    """Adds eps everywhere: it makes dark images of class 1 right instead of wrong."""

    def perturb(self, model, x, y, generator):
        return (x + self.threat.eps).clamp(0, 1)


def test_reference_robust_metric_counts_adversarial_correctness_on_its_own():
    x = torch.cat([torch.full((2, 1, 4, 4), 0.45), torch.full((2, 1, 4, 4), 0.8)])
    y = torch.tensor([1, 1, 0, 1])  # clean: wrong, wrong, wrong, right
    attack = _Brighten(ThreatModel("Linf", 0.1))
    report = ssni.evaluate(
        _MeanBrightness(), attack, (x, y), seeds=[1], batch_size=4, sanity_checks=False
    )
    # adversarial: right, right, wrong, right; ours needs the clean input right too
    assert report.clean_accuracy == 0.25
    assert report.robust_accuracy == 0.25
    assert report.robust_accuracy_reference == 0.75
    assert report.per_seed[0]["robust_accuracy_reference"] == 0.75
    assert "reference's metric" in report.summary()
