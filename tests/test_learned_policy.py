"""The learned noise-level policy: range, gradients, policy files, training, train-policy."""

import sys
from pathlib import Path

import pytest
import torch

import ssni
from ssni.cli.main import main
from ssni.core.learned import feature_names
from ssni.eval.calibrate import POLICY_KINDS, load_policy, read_policy_file, save_policy
from ssni.eval.learn import PolicyData, fit_policy, optimal_levels, policy_features, train_policy

sys.path.insert(0, str(Path(__file__).parent))
from _cli_helpers import record_splits, tiny_sets, tiny_weights  # noqa: E402

ROW = "fmnist-diffpure-ssni-learned-pgd-linf"


def _images(n, seed, scale=0.25):
    g = torch.Generator().manual_seed(seed)
    x = 0.5 + scale * torch.randn(n, 1, 8, 8, generator=g)
    return x.clamp(0, 1)


def _policy(levels=4, bias=0.0, hidden=8, seed=0, **kw):
    model = ssni.GaussianScore(std=0.3)
    policy = ssni.LearnedPolicy(model, t_star=0.1, bias=bias, levels=levels, hidden=hidden, **kw)
    e, feats = policy_features(policy, _images(32, 1), generator=torch.Generator().manual_seed(0))
    policy.set_feature_statistics(feats)
    policy.set_statistics(e)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a non-trivial network
        for p in [policy.e_weight, policy.offset, *policy.rest.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g))
    return policy


def test_features_come_from_the_ssni_probe():
    policy = _policy(levels=5)
    x = _images(6, 2)
    e, feats = policy.probe(x, generator=torch.Generator().manual_seed(3))
    e_ssni = ssni.eps_score_norm(policy.model, x, probe_levels=5,
                                 generator=torch.Generator().manual_seed(3))
    assert torch.allclose(e, e_ssni)
    assert feats.shape == (6, len(feature_names(5))) == (6, 5 + 3)
    assert torch.allclose(feats[:, 0], e.log())


def test_levels_never_leave_zero_to_t_star_plus_b_and_lie_on_the_grid():
    for bias in (0.0, 0.025):
        policy = _policy(bias=bias)
        inputs = [_images(16, 4), torch.zeros(4, 1, 8, 8), torch.ones(4, 1, 8, 8),
                  torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(5))]
        for offset in (-50.0, 0.0, 50.0):
            with torch.no_grad():
                policy.offset.fill_(offset)
            for x in inputs:
                t = policy(x)
                assert t.shape == (x.shape[0],)
                assert bool((t >= 0).all()) and bool((t <= 0.1 + bias + 1e-9).all())
                assert torch.allclose(t * 1000, (t * 1000).round(), atol=1e-4)
        with torch.no_grad():
            policy.offset.fill_(50.0)
        assert torch.allclose(policy(inputs[0]), torch.full((16,), 0.1 + bias), atol=1e-6)


def test_the_level_is_differentiable_and_monotone_in_e():
    policy = _policy(differentiable=True)
    x = _images(8, 6).requires_grad_(True)
    t = policy(x, generator=torch.Generator().manual_seed(0))
    assert t.requires_grad
    (grad,) = torch.autograd.grad(t.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # through a defense: the gradient of the logits reaches the input via t(x) as well
    defense = ssni.relaxed(ssni.Defense(torch.nn.Sequential(torch.nn.Flatten(),
                                                            torch.nn.Linear(64, 3)),
                                        ssni.DiffPure(policy.model, reverse_steps=2),
                                        _policy(differentiable=False)))
    assert defense.policy.differentiable
    xr = _images(4, 7).requires_grad_(True)
    out = defense(xr, generator=torch.Generator().manual_seed(0))
    (g2,) = torch.autograd.grad(out.sum(), xr)
    assert torch.isfinite(g2).all() and g2.abs().sum() > 0
    # monotone in e(x): raising log e with the other features fixed never lowers the level
    feats = policy_features(policy, _images(8, 8))[1].float()
    higher = feats.clone()
    higher[:, 0] += 1.0
    assert bool((policy.level_from_features(higher) >= policy.level_from_features(feats)).all())
    # without differentiable=True the probe runs without a graph
    plain = _policy()
    assert not plain(_images(4, 9).requires_grad_(True)).requires_grad


def test_policy_file_round_trip(tmp_path):
    policy = _policy(levels=3, bias=0.02, hidden=5)
    path = save_policy(tmp_path / "learned.safetensors", policy, info={"note": "test"})
    doc = read_policy_file(path)
    assert doc["policy"] == "ssni-learned" and doc["info"]["note"] == "test"
    assert doc["features"] == feature_names(3)
    loaded = load_policy(path, policy.model)
    assert isinstance(loaded, ssni.LearnedPolicy)
    assert (loaded.t_star, loaded.bias, loaded.levels, loaded.hidden) == (0.1, 0.02, 3, 5)
    own = {k: v for k, v in policy.state_dict().items() if not k.startswith("model.")}
    for k, v in own.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = _images(8, 3)
    t1 = policy(x, generator=torch.Generator().manual_seed(1))
    t2 = loaded(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(t1, t2)
    with pytest.raises(ValueError):
        save_policy(tmp_path / "learned.json", policy)
    with pytest.raises(ValueError):  # an untrained policy has no statistics to save
        save_policy(tmp_path / "u.safetensors", ssni.LearnedPolicy(policy.model, levels=3))


def test_policy_kinds_match_the_configuration_choices():
    from ssni.cli.config import CHOICES

    assert tuple(CHOICES["policy"]) == POLICY_KINDS


def test_optimal_levels():
    grid = torch.tensor([0.0, 0.05, 0.1], dtype=torch.float64)
    correct = torch.tensor([[True, True, True], [False, False, True], [False, True, False],
                            [False, False, False]])
    t, ok = optimal_levels(correct, grid, 0.1)
    assert t.tolist() == [0.0, 0.1, 0.05, 0.1] and ok.tolist() == [True, True, True, False]
    t, _ = optimal_levels(correct, grid, None)
    assert torch.isnan(t[3])


def _synthetic_data(n=96, seed=0):
    """Clean images are right from level 0, adversarial ones from a level that grows with e."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([0.0, 0.025, 0.05, 0.075, 0.1], dtype=torch.float64)
    k = 4
    e_c = torch.randn(n, generator=g, dtype=torch.float64) * 0.1
    e_a = 1.0 + torch.randn(n, generator=g, dtype=torch.float64) * 0.3

    def feats(e):
        noise = 0.05 * torch.randn(n, k + 2, generator=g, dtype=torch.float64)
        return torch.cat([e[:, None], noise], dim=1)

    need = (e_a.clamp(0.4, 1.6) - 0.4) / 1.2 * 4  # 0..4 grid index
    cols = torch.arange(5, dtype=torch.float64)
    tab_a = cols[None, :] >= need.round()[:, None]
    tab_c = torch.ones(n, 5, dtype=torch.bool)
    tab_c[:, -1] = False  # clean images lose at t*
    return PolicyData(grid, feats(e_c), feats(e_a), e_c.exp(), e_a.exp(), tab_c, tab_a)


def test_training_beats_the_constant_level_and_weights_shift_levels_up():
    data = _synthetic_data()
    policy = ssni.LearnedPolicy(ssni.GaussianScore(std=0.3), t_star=0.1, levels=4, hidden=4)
    res = train_policy(policy, data, under_weights=(1.0, 16.0), steps=400, seed=0)
    assert res.baseline["clean_acc"] == 0.0  # constant t* loses every clean image here
    assert res.final["clean_acc"] > 0.9 and res.final["robust_acc"] > 0.5
    assert res.chosen["under_weight"] in (1.0, 16.0) and len(res.table) == 2
    # a larger under-noising weight never lowers the adversarial levels on average
    t_c, t_a = data.targets(policy.max_level)
    feats = torch.cat([data.features_clean, data.features_adv])
    targets = torch.cat([t_c, t_a])
    adv = torch.cat([torch.zeros(96, dtype=torch.bool), torch.ones(96, dtype=torch.bool)])
    means = []
    for w in (1.0, 16.0):
        fit_policy(policy, feats, targets, adv, under_weight=w, steps=400)
        with torch.no_grad():
            means.append(float(policy.level_from_features(data.features_adv).mean()))
    assert means[1] >= means[0]


def test_train_policy_reads_validation_data_only(tmp_path, monkeypatch, capsys, fashion_mnist):
    import ssni.data.registry as data

    s, c = tiny_weights(tmp_path)
    train_only, requested, original = record_splits(tmp_path, monkeypatch, fashion_mnist)
    out = tmp_path / "lp"
    sets = tiny_sets(s, c, data_dir=train_only, learn_n=8, learn_steps=50,
                     learn_resolution=0.05, learn_weights="1,4")
    assert main(["--quiet", "train-policy", "--preset", ROW, *sets, "--out", str(out)]) == 0, \
        capsys.readouterr().err
    assert requested and set(requested) == {"val"}
    doc = read_policy_file(out / "policy.safetensors")
    assert doc["policy"] == "ssni-learned" and doc["levels"] == 2
    assert doc["info"]["data"]["split"] == "val" and "train-policy" in doc["info"]["command"]
    assert doc["info"]["training"]["under_weight"] in (1.0, 4.0)
    # the default learn_t_min = -1 chooses the floor among the table's levels, each attacked
    training = doc["info"]["training"]
    assert training["floor_selected"] and training["floors"] == training["grid"]
    assert doc["t_min"] == training["t_min"] in training["floors"]
    assert set(training["targets"]["floor_robust"]) == {f"{f:g}" for f in training["floors"]}
    assert doc["statistics"]["count"] == 8  # clean norms of the validation images
    # a rerun with the same data settings reuses the training data (no data read at all)
    requested.clear()
    assert main(["--quiet", "train-policy", "--preset", ROW, *sets, "--out", str(out)]) == 0
    assert requested == []
    # evaluate accepts the file, also with the adaptive attack through t(x)
    monkeypatch.setattr(data, "load_dataset", original)
    for extra in ([], ["--set", "adaptive_t=true"]):
        run = tmp_path / f"run{len(extra)}"
        args = ["--quiet", "evaluate", "--preset", ROW, *tiny_sets(s, c), "--set", "seeds=121",
                "--set", f"policy_file={out / 'policy.safetensors'}", *extra, "--out", str(run)]
        assert main(args) == 0, capsys.readouterr().err
        assert (run / "report.json").is_file()
    # the preset without a trained file gives a one-line configuration error
    missing = ["--quiet", "evaluate", "--preset", ROW, *tiny_sets(s, c),
               "--set", f"policy_file={tmp_path / 'none.safetensors'}", "--out", str(tmp_path)]
    assert main(missing) == 2


def test_shipped_learned_policy_loads_through_every_learned_preset():
    from ssni.cli import build
    from ssni.cli.config import load_config

    for base in ("diffpure", "gdmp", "gns"):
        cfg = load_config(f"fmnist-{base}-ssni-learned-pgd-linf")
        assert cfg.policy == "ssni-learned"
        implied = build.policy_overrides(cfg)
        assert implied["policy"] == "ssni-learned" and implied["levels"] == cfg.levels
        path = build.resolve_policy_file(cfg.policy_file)
        doc = read_policy_file(path)
        assert doc["info"]["data"]["split"] == "val"
        assert doc["info"]["command"].startswith("ssni train-policy")
        policy = load_policy(path, ssni.GaussianScore(std=0.3))
        assert policy.fitted and policy.max_level == pytest.approx(cfg.t_star + cfg.bias)
        # clean norm statistics of its 64 validation images (the constrained attack's target);
        # trained without a floor, as recorded in its command
        assert policy.has_statistics and policy.statistics()["count"] == 64
        assert policy.t_min == 0.0 and "learn_t_min=0" in doc["info"]["command"]
        t = policy(torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
        assert bool((t >= 0).all()) and bool((t <= policy.max_level + 1e-9).all())


# --- clean EPS-norm statistics (the constrained attack's target) ------------------------
def _trained(levels=4, hidden=4, t_min=0.0):
    """A learned policy trained by train_policy on the synthetic data (statistics included)."""
    data = _synthetic_data(n=32)
    policy = ssni.LearnedPolicy(ssni.GaussianScore(std=0.3), t_star=0.1, levels=levels,
                                hidden=hidden, t_min=t_min)
    res = train_policy(policy, data, under_weights=(4.0,), steps=50, seed=0)
    return policy, data, res


def test_training_records_the_clean_norm_statistics_of_all_images():
    policy, data, res = _trained()
    s = policy.statistics()
    e = data.e_clean
    assert s["count"] == e.numel() == 32
    assert s["mean"] == pytest.approx(float(e.mean()), rel=1e-6)
    assert s["std"] == pytest.approx(float(e.std()), rel=1e-6)
    assert (s["min"], s["max"]) == pytest.approx((float(e.min()), float(e.max())), rel=1e-6)
    assert res.statistics == s
    # without them (an untrained policy) statistics() says what to do
    with pytest.raises(RuntimeError, match="train-policy"):
        ssni.LearnedPolicy(policy.model, levels=3).statistics()
    with pytest.raises(ValueError):
        policy.set_statistics(torch.ones(5))


def test_statistics_and_floor_round_trip_through_the_policy_file(tmp_path):
    policy, _, _ = _trained(t_min=0.03)
    path = save_policy(tmp_path / "p.safetensors", policy)
    doc = read_policy_file(path)
    assert doc["statistics"] == policy.statistics() and doc["t_min"] == 0.03
    loaded = load_policy(path, policy.model)
    assert loaded.statistics() == policy.statistics()
    assert loaded.t_min == 0.03 and loaded.min_level == pytest.approx(0.03)
    x = _images(8, 3)
    assert torch.equal(policy(x, generator=torch.Generator().manual_seed(1)),
                       loaded(x, generator=torch.Generator().manual_seed(1)))


def test_a_policy_file_without_statistics_or_floor_still_loads(tmp_path):
    """Files written before the statistics and the floor existed: same levels, no statistics,
    and a clear refusal from the constrained attack."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ssni.cli import build
    from ssni.cli.config import ConfigError, RunConfig

    policy, _, _ = _trained()
    new = save_policy(tmp_path / "new.safetensors", policy)
    with safe_open(str(new), framework="pt") as f:
        doc = json.loads(f.metadata()["ssni-policy"])
    for k in ("statistics", "t_min"):
        doc.pop(k)
    tensors = {k: v for k, v in load_file(str(new)).items() if not k.startswith("norm_")}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"ssni-policy": json.dumps(doc)})
    loaded = load_policy(old, policy.model)
    assert loaded.t_min == 0.0 and not loaded.has_statistics
    x = _images(8, 3)
    assert torch.equal(policy(x, generator=torch.Generator().manual_seed(1)),
                       loaded(x, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(RuntimeError):
        loaded.statistics()
    # a file with only some of the statistics is refused
    partial = tmp_path / "partial.safetensors"
    save_file({**tensors, "norm_mean": torch.tensor(1.0)}, str(partial),
              metadata={"ssni-policy": json.dumps(doc)})
    with pytest.raises(ValueError, match="do not match"):
        load_policy(partial, policy.model)
    defense = ssni.Defense(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)),
                           ssni.DiffPure(policy.model, reverse_steps=2), loaded)
    cfg = RunConfig(dataset="digits", policy="ssni-learned", policy_file=str(old),
                    attack="constrained", gradient="bpda", iterations=1).replace()
    with pytest.raises(ConfigError, match="statistics"):
        build.build_attack(cfg, defense)


def test_two_phase_runs_on_a_learned_policy_defense():
    from _models import TinyClassifier, gaussian_images, tiny_eps_model
    from ssni.attacks import ThreatModel, TwoPhase, clean_norm_target
    from ssni.cli import build
    from ssni.cli.config import RunConfig

    score = tiny_eps_model(1)
    policy = ssni.LearnedPolicy(score, t_star=0.1, levels=3, hidden=4)
    clean = gaussian_images(32, seed=5)
    e, feats = policy_features(policy, clean, generator=torch.Generator().manual_seed(0))
    policy.set_feature_statistics(feats)
    policy.set_statistics(e)
    defense = ssni.Defense(TinyClassifier(seed=0), ssni.DiffPure(score, reverse_steps=2), policy)
    x = gaussian_images(6, seed=7)
    y = torch.arange(6) % 10
    threat = ThreatModel("Linf", 0.1)
    attack = TwoPhase(threat, policy, norm_steps=2, steps=2, step_size=0.03, eot=1)
    x_adv = attack(defense, x, y, torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and threat.contains(x_adv, x).all()
    per = attack.last_stats["per_sample"]
    assert (per["min_norm"] <= per["phase1_norm"] + 1e-6).all()
    assert attack.target == pytest.approx(clean_norm_target(policy))
    t = policy(x_adv)
    assert bool((t >= 0).all()) and bool((t <= policy.max_level + 1e-9).all())
    # selected by name from the configuration, also with the gradient through t(x)
    for adaptive in (False, True):
        cfg = RunConfig(dataset="digits", policy="ssni-learned", policy_file="p.safetensors",
                        attack="constrained", gradient="bpda", iterations=1, norm_steps=1,
                        adaptive_t=adaptive).replace()
        setup = build.build_attack(cfg, defense)
        assert isinstance(setup.attack, TwoPhase)
        out = setup.attack(setup.target.gradient, x, y, torch.Generator().manual_seed(0))
        assert threat.contains(out, x).all()


# --- the floor t_min ------------------------
def test_the_floor_bounds_the_levels_from_below_inside_zero_to_t_star_plus_b():
    for bias, t_min in ((0.0, 0.0), (0.0, 0.02), (0.025, 0.05), (0.0, 0.1)):
        policy = _policy(bias=bias, t_min=t_min)
        assert policy.min_level == pytest.approx(t_min)
        x = _images(16, 4)
        for offset in (-50.0, 0.0, 50.0):
            with torch.no_grad():
                policy.offset.fill_(offset)
            t = policy(x)
            assert bool((t >= t_min - 1e-9).all()) and bool((t <= 0.1 + bias + 1e-9).all())
            assert bool((t >= 0).all())
        with torch.no_grad():
            policy.offset.fill_(-50.0)
        assert torch.allclose(policy(x), torch.full((16,), t_min), atol=1e-6)
    with pytest.raises(ValueError):
        _policy(t_min=0.2)
    with pytest.raises(ValueError):
        _policy(t_min=-0.01)
    # no floor: exactly the level of the policy before the floor existed
    policy = _policy()
    feats = policy_features(policy, _images(8, 8))[1].float()
    assert torch.equal(policy.level_from_features(feats),
                       torch.sigmoid(policy.logit(feats)) * policy.max_level)


def test_fit_policy_raises_targets_to_the_floor_and_a_floor_at_the_ceiling_is_constant():
    data = _synthetic_data(n=32)
    t_c, t_a = data.targets(0.1)
    feats = torch.cat([data.features_clean, data.features_adv])
    targets = torch.cat([t_c, t_a])
    adv = torch.cat([torch.zeros(32, dtype=torch.bool), torch.ones(32, dtype=torch.bool)])
    policy = ssni.LearnedPolicy(ssni.GaussianScore(std=0.3), t_star=0.1, levels=4, hidden=4,
                                t_min=0.05)
    policy.set_feature_statistics(data.features_clean)
    fit_policy(policy, feats, targets, adv, steps=300)
    with torch.no_grad():
        t = policy.quantize(policy.level_from_features(data.features_clean))
    assert bool((t >= 0.05 - 1e-9).all())
    assert float(t.mean()) < 0.07  # clean targets are 0, raised to the floor 0.05
    top = ssni.LearnedPolicy(ssni.GaussianScore(std=0.3), t_star=0.1, levels=4, t_min=0.1)
    top.set_feature_statistics(data.features_clean)
    assert fit_policy(top, feats, targets, adv, steps=300) == []
    with torch.no_grad():
        assert torch.allclose(top.level_from_features(feats).float(), torch.full((64,), 0.1))


def test_the_floor_is_chosen_on_validation_by_its_worst_case():
    """Level 0 looks free on the transfer data (clean images are right there) but an attack
    aimed at it wins everywhere: no floor 0 is feasible, a positive floor is chosen."""
    data = _synthetic_data(n=64)
    n = 64
    levels = data.grid[data.grid <= 0.1]
    correct = torch.ones(n, levels.numel(), dtype=torch.bool)
    correct[:, 0] = False  # the bare classifier loses every image to an attack aimed at it
    data = data.with_floors(levels, correct)
    assert data.floor_column(0.05).all() and not data.floor_column(0.0).any()
    assert data.floor_column(0.033) is None
    policy = ssni.LearnedPolicy(ssni.GaussianScore(std=0.3), t_star=0.1, levels=4, hidden=4)
    res = train_policy(policy, data, under_weights=(1.0, 4.0), steps=200, seed=0,
                       floors=levels.tolist(), min_robust=0.3)
    assert res.floor_selected and res.floors == levels.tolist()
    assert res.t_min > 0 and policy.t_min == res.t_min
    zero_rows = [r for r in res.table if r["t_min"] == 0.0]
    assert zero_rows and all(r["robust_acc"] == 0.0 and not r["feasible"] for r in zero_rows)
    assert all("robust_transfer" in r and "robust_floor" in r for r in res.table)
    assert res.targets["floor_robust"]["0"] == 0.0
    t = policy(torch.zeros(1, 1, 8, 8))  # any input: never below the chosen floor
    assert float(t.min()) >= res.t_min - 1e-9
    # without floors the policy's own floor is kept (no floor measurements needed)
    plain = ssni.LearnedPolicy(ssni.GaussianScore(std=0.3), t_star=0.1, levels=4, hidden=4)
    res0 = train_policy(plain, _synthetic_data(n=64), under_weights=(4.0,), steps=50)
    assert res0.t_min == 0.0 and not res0.floor_selected
    with pytest.raises(ValueError, match="floor"):
        train_policy(plain, _synthetic_data(n=64), under_weights=(4.0,), steps=50, floors=[0.0])
