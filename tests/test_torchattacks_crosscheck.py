"""Cross-check against an independent implementation (torchattacks) on a deterministic model."""

import pytest
import torch

from _digits import trained_digits_mlp
from ssni.attacks import APGD, PGD, ThreatModel
from ssni.data import load_digits

torchattacks = pytest.importorskip(
    "torchattacks", reason="install with: pip install --no-deps torchattacks"
)

STEPS = 50


def _data():
    xt, yt = load_digits("test")
    xv, yv = load_digits("val")
    return torch.cat([xt, xv]), torch.cat([yt, yv])


def _acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


CASES = {
    "PGD-Linf": (
        lambda: PGD(ThreatModel("Linf", 0.1), iterations=STEPS, step_size=0.01, eot=1),
        lambda m: torchattacks.PGD(m, eps=0.1, alpha=0.01, steps=STEPS, random_start=False),
    ),
    "PGD-L2": (
        lambda: PGD(ThreatModel("L2", 0.5), iterations=STEPS, step_size=0.05, eot=1),
        lambda m: torchattacks.PGDL2(m, eps=0.5, alpha=0.05, steps=STEPS, random_start=False),
    ),
    "APGD-CE-Linf": (
        lambda: APGD(ThreatModel("Linf", 0.1), loss="ce", iterations=STEPS, eot=1),
        lambda m: torchattacks.APGD(m, norm="Linf", eps=0.1, steps=STEPS, loss="ce"),
    ),
    "APGD-DLR-Linf": (
        lambda: APGD(ThreatModel("Linf", 0.1), loss="dlr", iterations=STEPS, eot=1),
        lambda m: torchattacks.APGD(m, norm="Linf", eps=0.1, steps=STEPS, loss="dlr"),
    ),
    "APGD-CE-L2": (
        lambda: APGD(ThreatModel("L2", 0.5), loss="ce", iterations=STEPS, eot=1),
        lambda m: torchattacks.APGD(m, norm="L2", eps=0.5, steps=STEPS, loss="ce"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_robust_accuracy_matches_torchattacks(case):
    ours_factory, theirs_factory = CASES[case]
    model = trained_digits_mlp()
    x, y = _data()
    torch.manual_seed(0)
    theirs = _acc(model, theirs_factory(model)(x, y), y)
    ours = _acc(model, ours_factory()(model, x, y, torch.Generator().manual_seed(0)), y)
    clean = _acc(model, x, y)
    assert theirs < clean - 0.2, "the budget must make the comparison informative"
    assert abs(ours - theirs) <= 0.02, f"{case}: ours {ours:.4f}, torchattacks {theirs:.4f}"
