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


# --- 1. PGD-L2 step ------------------------------------------------------------------------------
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
    ours = PGD(threat, iterations=5, step_size=0.007 * 4, eot=1, l2_step="sign")(model, x, y)
    ref = _reference_l2_pgd(model, x, y, 0.5, 0.007 * 4, 5)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # 5 sign steps of 0.028 on 192 pixels reach the edge of the ball (0.028 * sqrt(192) = 0.39)
    assert (threat.distance(ours, x) > 0.49).all()
    # the textbook step moves 0.028 per step in L2 length: far from the edge, and not the same
    textbook = PGD(threat, iterations=5, step_size=0.007 * 4, eot=1)(model, x, y)
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


# --- 3. time labels of discrete checkpoint families ----------------------------------------------
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


# --- 5. the reference's robust metric beside ours ------------------------------------------------
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


# --- 6. the recorded t(x) is the one each prediction used ----------------------------------------
class _RandomLevel(ssni.NoiseLevelPolicy):
    """A level drawn from the generator: a second draw would give another one."""

    def forward(self, x, generator=None):
        k = torch.randint(1, 200, (x.shape[0],), generator=generator)
        return k.to(x.dtype) / 1000.0


class _LevelImage(ssni.Purifier):
    """Writes the level into the image, so the classifier can read it back."""

    def run(self, x, t, generator=None):
        from ssni.core.purifiers import Purification

        out = x * 0 + t.view(-1, 1, 1, 1) * 4
        return Purification(out, torch.zeros(x.shape[0], dtype=torch.long))


class _LevelClassifier(nn.Module):
    """Predicts ``round(1000 t) mod 10`` of the level written by :class:`_LevelImage`."""

    def forward(self, x):
        k = torch.round(x.flatten(1)[:, 0] / 4 * 1000).long() % 10
        return 10.0 * nn.functional.one_hot(k, 10).to(x.dtype)


@pytest.mark.parametrize("votes", [1, 3])
def test_records_hold_the_level_each_prediction_used(votes):
    defense = ssni.Defense(_LevelClassifier(), _LevelImage(), _RandomLevel())
    x = torch.rand(12, 1, 4, 4, generator=_g(0))
    y = torch.zeros(12, dtype=torch.long)
    attack = PGD(ThreatModel("Linf", 0.01), iterations=1, eot=1)
    report = ssni.evaluate(
        defense, attack, (x, y), seeds=[5], votes=votes, batch_size=6, sanity_checks=False
    )
    for r in report.records:
        assert r["clean_passes"][0] == round(1000 * r["t_clean"]) % 10
        assert r["adv_passes"][0] == round(1000 * r["t_adv"]) % 10
        if votes > 1:
            assert [round(1000 * t) % 10 for t in r["t_clean_passes"]] == r["clean_passes"]
            assert [round(1000 * t) % 10 for t in r["t_adv_passes"]] == r["adv_passes"]


def test_defense_run_reports_the_score_norm_behind_t():
    from _models import gaussian_images, tiny_eps_model

    score = tiny_eps_model(1)
    policy = ssni.SSNI(score, t_star=0.1, probe_levels=4).fit([gaussian_images(16, seed=5)], _g(0))
    defense = ssni.Defense(TinyClassifier(), ssni.DiffPure(score, reverse_steps=2), policy)
    x = gaussian_images(4, seed=9)
    out = defense.run(x, generator=_g(3))
    t, e = policy.levels_and_norms(x, generator=_g(3))
    torch.testing.assert_close(out.t, t)
    torch.testing.assert_close(out.score_norm, e)
    torch.testing.assert_close(policy.quantize(policy.level_from_norm(out.score_norm)), out.t)
    with torch.no_grad():
        torch.testing.assert_close(defense(x, generator=_g(3)), out.logits)


# --- 6. APGD picks its iterate on the real defense when handed a Surrogate estimator -------------
class _PeakAtStart(nn.Module):
    """Loss is highest at the start point ``x0``: every step away makes it smaller."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x):
        d = (x - self.x0).flatten(1).norm(dim=1, keepdim=True)
        return torch.cat([d, torch.zeros_like(d)], dim=1)  # CE of class 0 falls with distance


class _AwayFromStart(nn.Module):
    """Surrogate whose loss grows along the first pixel axis."""

    def forward(self, x):
        v = x.flatten(1)[:, :1]
        return torch.cat([-10 * v, torch.zeros_like(v)], dim=1)


def test_apgd_with_surrogate_estimator_chooses_on_the_real_model():
    from ssni.attacks import APGD, Surrogate

    x = torch.full((3, 1, 4, 4), 0.5)
    y = torch.zeros(3, dtype=torch.long)  # CE of class 0: lowest at x0 for the real model
    real = _PeakAtStart(x)
    apgd = APGD(ThreatModel("Linf", 0.1), iterations=8, random_start=False,
                gradient=Surrogate(_AwayFromStart(), n=1))
    out = apgd(real, x, y)
    # on the surrogate every step raises the loss; on the real model none does: the start wins
    torch.testing.assert_close(out, x)
    on_surrogate = APGD(ThreatModel("Linf", 0.1), iterations=8, random_start=False, eot=1)
    assert (on_surrogate(_AwayFromStart(), x, y) - x).abs().max() > 0.05


def test_gns_presets_use_or_reject_surrogate_steps():
    from _models import tiny_eps_model
    from ssni.cli.build import build_purifier
    from ssni.cli.config import ConfigError

    model = tiny_eps_model(0, channels=3)
    for name in [n for n in config_mod.list_presets() if n.startswith("cifar10-gns")]:
        cfg = config_mod.load_config(name)
        if cfg.gradient != "surrogate":
            continue
        sur = build_purifier(cfg, model, surrogate=True)
        assert sur.stages == (0.03, 0.05, 0.125) and sur.stage_steps == (1, 1, 5)
        with pytest.raises(ConfigError, match="surrogate_steps"):
            build_purifier(cfg.replace(surrogate_steps=20), model, surrogate=True)


def test_readme_states_the_measured_schedule_agreement():
    from pathlib import Path

    t = torch.arange(0, 1001, dtype=torch.float64) / 1000
    diff = (ssni.VPSchedule().alpha_bar(t) - ssni.VPSchedule(discrete=True).alpha_bar(t)).abs()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert f"most {float(diff.max()):.1e}".replace("e-04", "e-4") in readme
    assert f"`t = {float(t[diff.argmax()]):.3f}`" in readme


def test_paper_presets_share_one_level_per_gradient_estimate():
    rows = [n for n in config_mod.list_presets() if n.startswith(("cifar10-", "imagenet-"))]
    assert len(rows) == 30
    for name in rows:
        assert config_mod.load_config(name).eot_share_t, name
