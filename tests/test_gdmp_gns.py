"""GDMP and GNS purifiers with SSNI (issue 7), checked on the analytic Gaussian score."""

import pytest
import torch

import ssni
from _models import CountingScore, TinyClassifier, gaussian_images
from ssni.core.gdmp import GDMP, GDMP_CIFAR10_SCALE, mse_distance_grad, ssim_distance_grad
from ssni.core.gns import GNS, GNS_CIFAR10_STAGES
from ssni.core.purifiers import to_image_space, to_model_space
from ssni.core.ssim import ssim, ssim_map


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _model():
    return ssni.GaussianScore(mean=0.0, std=0.5)


def _off_distribution(n=16, size=8, seed=0):
    """Uniform-noise images, far from the Gaussian model's data: purification moves them."""
    return torch.rand(n, 1, size, size, generator=_gen(seed))


# --------------------------------------------------------------------------------------- GDMP


@pytest.mark.parametrize("distance", ["mse", "ssim"])
def test_gdmp_scale_zero_equals_diffpure(distance):
    model, x = _model(), gaussian_images(4)
    t = torch.tensor([0.05, 0.1, 0.0, 0.2])
    ours = GDMP(model, scale=0.0, rounds=1, distance=distance, reverse_steps=6).run(x, t, _gen(3))
    ref = ssni.DiffPure(model, reverse_steps=6).run(x, t, _gen(3))
    assert torch.equal(ours.x, ref.x)
    assert torch.equal(ours.nfe, ref.nfe)


def test_gdmp_rounds_chain_diffpure_passes_in_model_space():
    model, x, t = _model(), gaussian_images(3), torch.tensor([0.1, 0.05, 0.2])
    ours = GDMP(model, scale=0.0, rounds=3, reverse_steps=4).run(x, t, _gen(1))
    dp, g, z = ssni.DiffPure(model, reverse_steps=4), _gen(1), to_model_space(x)
    nfe = 0
    for _ in range(3):
        out = dp.denoise(z, t, g)
        z, nfe = out.x, nfe + out.nfe
    assert torch.allclose(ours.x, to_image_space(z), atol=1e-6)
    assert torch.equal(ours.nfe, nfe)
    assert ours.nfe.tolist() == [12, 12, 12]


@pytest.mark.parametrize("distance", ["mse", "ssim"])
@pytest.mark.parametrize("t", [0.1, 0.2])
def test_gdmp_guidance_keeps_outputs_closer_to_input(distance, t):
    model, x = _model(), _off_distribution()
    gaps = {}
    for name, p in {
        "diffpure": ssni.DiffPure(model, reverse_steps=20),
        "gdmp": GDMP(model, rounds=1, reverse_steps=20, distance=distance),
    }.items():
        gaps[name] = torch.stack(
            [(p(x, t, generator=_gen(s)) - x).flatten(1).norm(dim=1) for s in range(3)]
        ).mean()
    assert gaps["gdmp"] < 0.9 * gaps["diffpure"], gaps


def test_gdmp_larger_scale_pulls_harder():
    model, x = _model(), _off_distribution()
    gaps = [
        float(
            (GDMP(model, rounds=1, reverse_steps=20, scale=s)(x, 0.1, generator=_gen(0)) - x).norm()
        )
        for s in (0.0, 2.0, 10.0)
    ]
    assert gaps[0] > gaps[1] > gaps[2]


def test_gdmp_nfe_is_rounds_times_steps_and_guidance_costs_no_call():
    model = CountingScore(_model())
    x, t = gaussian_images(3), torch.tensor([0.0, 0.01, 0.03])
    out = GDMP(model, rounds=4, distance="ssim").run(x, t, _gen())
    assert out.nfe.tolist() == [0, 40, 120]
    assert model.rows == int(out.nfe.sum())


def test_distance_gradients_match_autograd():
    g = _gen(0)
    x = torch.rand(2, 3, 12, 12, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.rand(2, 3, 12, 12, generator=g, dtype=torch.float64) * 2 - 1
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(((xr - y) ** 2).sum(), xr)
    assert torch.allclose(mse_distance_grad(x, y), ref)
    # the SSIM guidance is the gradient of sum(1 - SSIM map): check against finite differences
    d = ssim_distance_grad(x, y)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    h = 1e-6

    def dist(z):
        return float((1 - ssim_map(z, y, data_range=2.0)).sum())

    fd = (dist(x + h * v) - dist(x - h * v)) / (2 * h)
    assert abs(fd - float((d * v).sum())) < 1e-5 * max(1.0, abs(fd))


@pytest.mark.parametrize("distance", ["mse", "ssim"])
def test_gdmp_gradients_exact_through_guidance(distance):
    """Full-gradient attacks differentiate through the guidance: autograd = finite differences."""
    model = ssni.GaussianScore(mean=0.0, std=0.5)
    p = GDMP(model, rounds=2, reverse_steps=3, distance=distance, scale=5.0)
    x = (0.3 + 0.4 * torch.rand(1, 1, 4, 4, generator=_gen(2))).double().requires_grad_(True)
    t = torch.tensor([0.05], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: p(z, t, generator=_gen(7)), (x,), atol=1e-6)


def test_gdmp_scale_schedules():
    model, x, t = _model(), gaussian_images(3), torch.tensor([0.1, 0.05, 0.2])
    vp = model.schedule
    a = GDMP(model, rounds=1, reverse_steps=5)(x, t, generator=_gen())
    b = GDMP(
        model,
        rounds=1,
        reverse_steps=5,
        scale_schedule=lambda s: vp.sigma(s) / vp.alpha_bar(s).sqrt(),
    )(x, t, generator=_gen())
    c = GDMP(model, rounds=1, reverse_steps=5, scale_schedule="constant")(x, t, generator=_gen())
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, c)


def test_gdmp_fixed_guidance_noise_is_deterministic_and_differs_from_fresh():
    model, x = _model(), gaussian_images(3)
    fixed = GDMP(model, rounds=2, reverse_steps=4, fixed_guidance_noise=True)
    fresh = GDMP(model, rounds=2, reverse_steps=4)
    assert torch.equal(fixed(x, 0.1, generator=_gen(5)), fixed(x, 0.1, generator=_gen(5)))
    assert not torch.equal(fixed(x, 0.1, generator=_gen(5)), fresh(x, 0.1, generator=_gen(5)))


def test_gdmp_published_defaults():
    p = GDMP(_model())
    assert p.rounds == 4 and p.distance == "mse" and p.step_size == 1e-3
    assert p.scale == pytest.approx(GDMP_CIFAR10_SCALE) and p.scale == pytest.approx(9.338, 1e-3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scale": -1.0},
        {"distance": "l1"},
        {"rounds": 0},
        {"scale_schedule": "linear"},
        {"reverse_steps": 0},
    ],
)
def test_gdmp_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        GDMP(_model(), **kwargs)


# ---------------------------------------------------------------------------------------- GNS


@pytest.mark.parametrize("steps", [None, 7])
def test_gns_one_stage_equals_diffpure(steps):
    model, x = _model(), gaussian_images(4)
    t = torch.tensor([0.1, 0.05, 0.0, 0.1])
    ours = GNS(model, stages=(0.1,), reverse_steps=steps).run(x, t, _gen(2))
    ref = ssni.DiffPure(model, reverse_steps=steps).run(x, t, _gen(2))
    assert torch.equal(ours.x, ref.x)
    assert torch.equal(ours.nfe, ref.nfe)


def test_gns_stages_chain_diffpure_passes():
    model, x = _model(), gaussian_images(3)
    ours = GNS(model, stages=(0.03, 0.05), reference_t=0.05).run(x, 0.05, _gen(4))
    dp, g, z = ssni.DiffPure(model), _gen(4), to_model_space(x)
    for level in (0.03, 0.05):
        z = dp.denoise(z, torch.full((3,), level), g).x
    assert torch.allclose(ours.x, to_image_space(z), atol=1e-6)
    assert ours.nfe.tolist() == [80, 80, 80]


def test_gns_ssni_factor_scales_every_stage():
    model, x = _model(), gaussian_images(3)
    a = GNS(model, stages=(0.04, 0.08)).run(x, 0.04, _gen(6))  # reference 0.08, factor 1/2
    b = GNS(model, stages=(0.02, 0.04)).run(x, 0.04, _gen(6))  # reference 0.04, factor 1
    assert torch.equal(a.x, b.x) and torch.equal(a.nfe, b.nfe)
    levels = GNS(model).stage_levels(torch.tensor([0.125, 0.0625, 0.0, 0.5]))
    assert levels.shape == (8, 4)
    assert torch.allclose(levels[:, 0], torch.tensor(GNS_CIFAR10_STAGES))
    assert torch.allclose(levels[:, 1], torch.tensor(GNS_CIFAR10_STAGES) / 2)
    assert float(levels[:, 2].abs().max()) == 0.0 and float(levels.max()) <= 1.0


def test_gns_published_defense_and_surrogate_nfe():
    model, x = _model(), gaussian_images(3)
    t = torch.tensor([0.125, 0.0625, 0.0])
    with torch.no_grad():
        defense = GNS(model).run(x, t, _gen())
        surrogate = GNS.surrogate(model).run(x, t, _gen())
    # 4 x 30 + 2 x 50 + 2 x 125 DDPM steps; at half the level 4 x 15 + 2 x 25 + 2 x 63
    assert defense.nfe.tolist() == [470, 236, 0]
    assert surrogate.nfe.tolist() == [7, 7, 0]
    assert torch.allclose(defense.x[2], x[2], atol=1e-6)


def test_gns_per_stage_steps_and_gradient_wrt_t():
    model, x = _model(), gaussian_images(2)
    t = torch.tensor([0.1, 0.06], requires_grad=True)
    out = GNS(model, stages=(0.05, 0.1), reverse_steps=(2, 3)).run(x, t, _gen())
    assert out.nfe.tolist() == [5, 5]
    (gt,) = torch.autograd.grad(out.x.sum(), t)
    assert bool(torch.isfinite(gt).all()) and float(gt.abs().sum()) > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stages": ()},
        {"stages": (0.0, 0.1)},
        {"stages": (0.1, 1.5)},
        {"reference_t": 0.0},
        {"reverse_steps": (1, 2)},
        {"reverse_steps": 0},
        {"reverse_step_size": 0.0},
    ],
)
def test_gns_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        GNS(_model(), **kwargs)


# ------------------------------------------------------------------------------ SSNI with both


def _fitted_ssni(model, t_star):
    policy = ssni.SSNI(model, t_star=t_star, probe_levels=2)
    return policy.fit([gaussian_images(32, seed=s) for s in range(2)], generator=_gen(9))


@pytest.mark.parametrize("kind", ["gdmp", "gns"])
def test_ssni_with_gdmp_and_gns(kind):
    model = CountingScore(_model())
    if kind == "gdmp":
        purifier = GDMP(model, rounds=2, reverse_step_size=1e-2)
        t_star = 0.1
    else:
        purifier = GNS(model, stages=(0.05, 0.1), reverse_step_size=1e-2)
        t_star = purifier.reference_t
    policy = _fitted_ssni(model, t_star)
    defense = ssni.Defense(TinyClassifier(), purifier, policy)
    x = torch.cat([gaussian_images(4, seed=5), _off_distribution(4, seed=6)])
    model.calls = model.rows = 0
    out = defense.run(x, generator=_gen(1))
    # EPS once on the input (one batched call of levels x B rows), then the purifier's calls
    assert model.rows == policy.levels * x.shape[0] + int(out.nfe.sum())
    assert out.t.unique().numel() > 1, "levels should be sample-specific"
    # more noise, no fewer network calls
    order = out.t.argsort()
    assert bool((out.nfe[order].diff() >= 0).all())
    assert out.logits.shape == (8, 10)


# ---------------------------------------------------------------------------------------- SSIM


def test_ssim_properties():
    g = _gen(0)
    x = torch.rand(3, 2, 16, 16, generator=g)
    noisy = [(x + s * torch.randn(x.shape, generator=g)).clamp(0, 1) for s in (0.05, 0.2, 0.5)]
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)
    assert torch.allclose(ssim(x, noisy[0]), ssim(noisy[0], x), atol=1e-6)
    vals = [float(ssim(x, n).mean()) for n in noisy]
    assert 1.0 > vals[0] > vals[1] > vals[2] > -1.0
    with pytest.raises(ValueError):
        ssim(x, x[:, :1])
