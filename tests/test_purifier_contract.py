"""The contract every purifier keeps: ``purifier.run(x, t, generator) -> (x, nfe)``."""

import pytest
import torch

import ssni
from _models import gaussian_images, tiny_eps_model
from ssni.core.gdmp import GDMP
from ssni.core.gns import GNS


def _diffpure(model):
    return ssni.DiffPure(model, reverse_steps=4)


def _gdmp_mse(model):
    return GDMP(model, reverse_steps=3, rounds=2, scale=5.0)


def _gdmp_ssim(model):
    return GDMP(model, reverse_steps=3, rounds=2, scale=5.0, distance="ssim")


def _gns(model):
    return GNS(model, stages=(0.05, 0.1, 0.05), reference_t=0.1, reverse_steps=(2, 3, 2))


def _straight_through(model):
    return ssni.StraightThrough(ssni.DiffPure(model, reverse_steps=4))


FACTORIES = {
    "diffpure": _diffpure,
    "gdmp-mse": _gdmp_mse,
    "gdmp-ssim": _gdmp_ssim,
    "gns": _gns,
    "straight-through": _straight_through,
}

T = torch.tensor([0.0, 0.1, 0.05, 0.2, 0.1])


@pytest.fixture(params=list(FACTORIES), ids=list(FACTORIES))
def purifier(request):
    return FACTORIES[request.param](ssni.GaussianScore(mean=0.0, std=0.5))


def _run(p, x, t, seed=0):
    return p.run(x, t, generator=torch.Generator().manual_seed(seed))


def test_shape_range_and_nfe(purifier):
    x = gaussian_images(5)
    out = _run(purifier, x, T)
    assert out.x.shape == x.shape and out.x.dtype == x.dtype
    assert float(out.x.min()) >= 0.0 and float(out.x.max()) <= 1.0
    assert out.nfe.shape == (5,) and out.nfe.dtype == torch.long
    assert int(out.nfe[0]) == 0 and bool((out.nfe[1:] > 0).all())
    assert torch.equal(purifier(x, T, generator=torch.Generator().manual_seed(0)), out.x)


def test_float_t_equals_constant_tensor(purifier):
    x = gaussian_images(3)
    a = _run(purifier, x, 0.1).x
    b = _run(purifier, x, torch.full((3,), 0.1)).x
    assert torch.equal(a, b)


def test_deterministic_under_seed(purifier):
    x = gaussian_images(5)
    a, b, c = _run(purifier, x, T, 3).x, _run(purifier, x, T, 3).x, _run(purifier, x, T, 4).x
    assert torch.equal(a, b)
    assert not torch.equal(a[1:], c[1:])


def test_no_grad_matches_grad_mode(purifier):
    x = gaussian_images(5)
    with torch.no_grad():
        a = _run(purifier, x, T).x
    b = _run(purifier, x, T).x
    assert torch.allclose(a, b, atol=1e-6)


def test_input_gradients_finite_and_nonzero(purifier):
    x = gaussian_images(5).requires_grad_(True)
    out = _run(purifier, x, T).x
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((out * w).sum(), x)
    assert bool(torch.isfinite(grad).all())
    assert bool((grad.flatten(1).abs().sum(1) > 0).all())


@pytest.mark.parametrize("name", list(FACTORIES))
def test_gradients_through_a_network(name):
    # the same contract with a small convolutional epsilon network instead of the Gaussian score
    x = gaussian_images(3).requires_grad_(True)
    out = FACTORIES[name](tiny_eps_model()).run(x, 0.1, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(out.x.sum(), x)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_per_sample_t_honoured(purifier):
    x = gaussian_images(5)
    out = _run(purifier, x, T)
    assert torch.allclose(out.x[0], x[0], atol=1e-6), "t = 0 must return the input"
    moved = (out.x[1:] - x[1:]).flatten(1).abs().amax(1)
    assert bool((moved > 1e-3).all())
    # more noise, more network calls (t = 0.2 vs 0.05)
    assert int(out.nfe[3]) >= int(out.nfe[2])


def test_rejects_bad_input(purifier):
    x = gaussian_images(2)
    with pytest.raises(ValueError):
        purifier.run(x * 3.0, 0.1)
    with pytest.raises(ValueError):
        purifier.run(x, torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError):
        purifier.run(x, torch.tensor([0.1, 0.1, 0.1]))
