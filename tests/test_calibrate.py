"""tau/b calibration on validation data, policy files, and the calibrate command."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ssni
from ssni.cli.main import main
from ssni.eval.calibrate import calibrate, load_policy, read_policy_file, save_policy

sys.path.insert(0, str(Path(__file__).parent))
from _cli_helpers import record_splits, tiny_sets, tiny_weights  # noqa: E402

ROW = "fmnist-diffpure-ssni-n-pgd-linf"


class MeanThreshold(nn.Module):
    def forward(self, x):
        p = (2 * x - 1).flatten(1).mean(1)
        return torch.stack([torch.zeros_like(p), 50.0 * p], dim=1)


def _data(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x_model = 0.25 * torch.randn(n, 1, 8, 8, generator=g) + shift
    x_model += 0.2 * torch.randn(n, 1, 1, 1, generator=g)
    x = ((x_model + 1) / 2).clamp(0, 1)
    y = ((2 * x - 1).flatten(1).mean(1) > 0).long()
    return x, y


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_policy_file_round_trip(tmp_path, suffix):
    model = ssni.GaussianScore(std=0.3)
    x, _ = _data(32, 0)
    policy = ssni.SSNI(model, t_star=0.1, reweight="linear", bias=0.02, probe_levels=4)
    policy.fit([x], torch.Generator().manual_seed(0))
    path = save_policy(tmp_path / f"p{suffix}", policy, info={"note": "test"})
    assert read_policy_file(path)["info"]["note"] == "test"
    loaded = load_policy(path, model)
    assert loaded.statistics() == pytest.approx(policy.statistics())
    assert (loaded.reweight, loaded.bias, loaded.levels) == ("linear", 0.02, 4)
    t1 = policy(x, generator=torch.Generator().manual_seed(1))
    t2 = loaded(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(t1, t2)
    const = load_policy(save_policy(tmp_path / f"c{suffix}", ssni.Constant(0.2)), model)
    assert isinstance(const, ssni.Constant) and const.t_star == 0.2
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError):
        read_policy_file(tmp_path / "bad.json")


@pytest.mark.parametrize("reweight", ["sigmoid", "linear"])
def test_grid_search_respects_objective_and_constraint(reweight):
    model = ssni.GaussianScore(std=0.3)
    purifier = ssni.DiffPure(model, reverse_steps=2)
    clf = MeanThreshold()
    x_stats, _ = _data(32, 0)
    x_cal, y_cal = _data(48, 1)
    x_adv = (x_cal + 0.05 * (1 - 2 * y_cal.float())[:, None, None, None]).clamp(0, 1)
    kwargs = dict(taus=(0.5, 1.0, 2.0), biases=(-0.05, 0.0, 0.05), resolution=0.02,
                  generator=torch.Generator().manual_seed(0))
    policy = ssni.SSNI(model, t_star=0.1, reweight=reweight, probe_levels=3)
    res = calibrate(policy, purifier, clf, x_stats, x_cal, y_cal, x_adv, **kwargs)
    assert policy.fitted and res.n_stats == 32 and res.n_calibration == 48
    expected_pairs = 3 * 3 if reweight == "sigmoid" else 2  # SSNI-L: one tau, no negative b
    assert len(res.table) == expected_pairs
    feasible = [r for r in res.table if r["robust_acc"] >= res.min_robust - 1e-12]
    assert res.min_robust == pytest.approx(res.baseline["robust_acc"])
    if feasible:
        assert res.chosen["clean_acc"] == max(r["clean_acc"] for r in feasible)
    assert policy.bias == res.chosen["bias"] and policy.tau == res.chosen["tau"]
    for weight, key in ((1.0, "clean_acc"), (0.0, "robust_acc")):
        p = ssni.SSNI(model, t_star=0.1, reweight=reweight, probe_levels=3)
        r = calibrate(p, purifier, clf, x_stats, x_cal, y_cal, x_adv, objective="weighted",
                      weight=weight, **kwargs)
        assert r.chosen[key] == max(row[key] for row in r.table)
    with pytest.raises(ValueError):
        calibrate(ssni.Constant(0.1), purifier, clf, x_stats, x_cal, y_cal, x_adv)


def test_calibrate_command_uses_validation_data_only(tmp_path, monkeypatch, capsys,
                                                     fashion_mnist):
    import ssni.data.registry as registry

    s, c = tiny_weights(tmp_path)
    train_only, requested, original = record_splits(tmp_path, monkeypatch, fashion_mnist)
    out = tmp_path / "cal"
    args = ["--quiet", "calibrate", "--preset", ROW, *tiny_sets(s, c, data_dir=train_only),
            "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    assert requested and set(requested) == {"val"}
    doc = read_policy_file(out / "policy.json")
    assert doc["policy"] == "ssni-n" and doc["statistics"]["count"] == 16
    cal = json.loads((out / "calibration.json").read_text())
    assert len(cal["table"]) == 3 * 2 and cal["chosen"]["bias"] in (0.0, 0.05)
    # evaluate accepts the policy file; the resolved configuration shows its tau and b
    monkeypatch.setattr(registry, "load_dataset", original)
    run = tmp_path / "run"
    assert main(["--quiet", "evaluate", "--preset", ROW, *tiny_sets(s, c),
                 "--set", f"policy_file={out / 'policy.json'}", "--out", str(run)]) == 0
    resolved = json.loads((run / "report.json").read_text())["rows"][0]["config"]
    assert resolved["tau"] == pytest.approx(doc["tau"]) and resolved["bias"] == doc["bias"]
    assert json.loads((run / "report.json").read_text())["extra"]["policy"]["statistics"][
        "mean"] == pytest.approx(doc["statistics"]["mean"])


def test_calibrate_needs_an_ssni_policy(tmp_path, capsys):
    args = ["calibrate", "--preset", "fmnist-diffpure-constant-pgd-linf", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ": policy:" in err
