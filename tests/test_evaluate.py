"""evaluate(): report, resumable log, sanity checks (issue 4)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import ssni
from _digits import digits_test, trained_digits_mlp
from _models import TinyClassifier, gaussian_images, tiny_eps_model
from ssni.attacks import APGD, PGD, ThreatModel, bpda
from ssni.eval.protocol import Report, evaluate

HERE = Path(__file__).resolve().parent
HELPER = HERE / "_evalkill_helper.py"


def _digits_defense(steps=2):
    score = ssni.GaussianScore(mean=-0.5, std=0.6)
    return ssni.Defense(trained_digits_mlp(), ssni.DiffPure(score, reverse_steps=steps),
                        ssni.Constant(0.02))


def _small_eval(tmp_path=None, **kw):
    x, y = digits_test(10)
    defense = _digits_defense()
    attack = PGD(ThreatModel("Linf", 0.2), iterations=4, step_size=0.05, eot=2)
    args = dict(seeds=[1, 2], votes=3, worst_of=3, batch_size=4, sanity_samples=8)
    args.update(kw)
    return evaluate(defense, attack, (x, y), **args)


def _log_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_report_contents_and_invariants():
    r = _small_eval()
    assert isinstance(r, Report)
    json.dumps(r.to_dict())  # plain JSON
    assert r.n_samples == 10 and len(r.records) == 20 and len(r.per_seed) == 2
    for rec in r.records:
        assert len(rec["clean_passes"]) == 3 and len(rec["adv_passes"]) == 3
        if not rec["clean_correct"]:
            assert not rec["robust"] and not rec["robust_worst"]
        if rec["robust_worst"]:  # all 3 passes right implies the majority of 3 is right
            assert rec["robust"]
        assert rec["perturbation"] <= 0.2 + 1e-6
        assert rec["t_clean"] == pytest.approx(0.02) and rec["score_norm_clean"] is None
    for p in r.per_seed:
        rs = [x for x in r.records if x["seed"] == p["seed"]]
        assert p["robust_accuracy"] == sum(x["robust"] for x in rs) / 10
    assert r.robust_accuracy_worst <= r.robust_accuracy <= r.clean_accuracy
    assert r.undefended is not None and r.undefended["robust_accuracy"] <= 0.1
    assert r.warnings == []
    assert len(r.t_adv) == 20 and "robust accuracy" in r.summary()


def test_batches_or_tensors_give_the_same_report():
    x, y = digits_test(10)
    a = _small_eval(seeds=[3], sanity_checks=False)
    b = evaluate(_digits_defense(), PGD(ThreatModel("Linf", 0.2), iterations=4,
                                       step_size=0.05, eot=2),
                 [(x[:3], y[:3]), (x[3:], y[3:])], seeds=[3], votes=3, worst_of=3, batch_size=4,
                 sanity_checks=False)
    assert a.to_dict() == b.to_dict()
    # clean results do not depend on the attack (paired comparisons between attacks)
    c = evaluate(_digits_defense(), APGD(ThreatModel("L2", 0.5), iterations=2, eot=1), (x, y),
                 seeds=[3], votes=3, worst_of=3, batch_size=4, sanity_checks=False)
    for ra, rc in zip(a.records, c.records):
        assert ra["clean_passes"] == rc["clean_passes"] and ra["t_clean"] == rc["t_clean"]


def test_ssni_records_and_surrogate(tmp_path):
    score = ssni.GaussianScore(mean=-0.5, std=0.6)
    policy = ssni.SSNI(score, t_star=0.05, probe_levels=3).fit([digits_test()[0][100:164]])
    defense = ssni.Defense(trained_digits_mlp(), ssni.DiffPure(score, reverse_steps=2), policy)
    x, y = digits_test(6)
    r = evaluate(defense, APGD(ThreatModel("L2", 1.0), iterations=3, eot=1), (x, y), seeds=[0],
                 surrogate=bpda(defense), batch_size=3, sanity_checks=False)
    assert r.config["surrogate"] is not None
    for rec in r.records:
        assert rec["score_norm_clean"] > 0 and rec["score_norm_adv"] > 0
        assert 0 <= rec["t_adv"] <= 0.05 + 1e-6


def test_restart_skips_done_work_and_gives_same_report(tmp_path):
    log = tmp_path / "run.jsonl"
    first = _small_eval(log_path=log)
    lines = _log_lines(log)
    assert lines[0]["kind"] == "config"
    assert sum(line["kind"] == "sample" for line in lines) == 20

    def exploding(*a, **k):
        raise AssertionError("a finished sample was attacked again")

    attack = PGD(ThreatModel("Linf", 0.2), iterations=4, step_size=0.05, eot=2)
    attack.perturb = exploding
    x, y = digits_test(10)
    again = evaluate(_digits_defense(), attack, (x, y), seeds=[1, 2], votes=3, worst_of=3,
                     batch_size=4, sanity_samples=8, log_path=log)
    assert again.to_dict() == first.to_dict()

    # a log cut inside a chunk and inside a line resumes to the same report, no duplicates
    raw = log.read_text().splitlines(keepends=True)
    log.write_text("".join(raw[:7]) + raw[7][:20])
    resumed = _small_eval(log_path=log)
    assert resumed.to_dict() == first.to_dict()
    keys = [(line["seed"], line["index"]) for line in _log_lines(log) if line["kind"] == "sample"]
    assert sorted(keys) == sorted({(s, i) for s in (1, 2) for i in range(10)})


def test_log_from_another_configuration_is_refused(tmp_path):
    log = tmp_path / "run.jsonl"
    _small_eval(log_path=log, seeds=[1])
    with pytest.raises(ValueError, match="another configuration"):
        _small_eval(log_path=log, seeds=[1], votes=1)
    with pytest.raises(ValueError, match="another configuration"):
        _small_eval(log_path=log, seeds=[1, 2])


class _Detached(nn.Module):
    """A classifier whose output carries no gradient to the input."""

    def __init__(self):
        super().__init__()
        self.inner = TinyClassifier()

    def forward(self, x):
        return self.inner(x.detach())


def test_sanity_warnings():
    # stochastic defense, EOT = 1
    r = _small_eval(seeds=[1], sanity_checks=True, votes=1, worst_of=1)
    assert r.warnings == []
    x, y = digits_test(8)
    r = evaluate(_digits_defense(), PGD(ThreatModel("Linf", 0.2), iterations=3,
                                       step_size=0.05, eot=1),
                 (x, y), seeds=[1], batch_size=8, sanity_samples=8)
    assert any("EOT = 1" in w for w in r.warnings)
    # an attack too weak to break the undefended classifier
    r = evaluate(_digits_defense(), PGD(ThreatModel("Linf", 0.2), iterations=1,
                                       step_size=1e-3, eot=2),
                 (x, y), seeds=[1], batch_size=8, sanity_samples=8)
    assert any("undefended" in w for w in r.warnings)
    # gradients that never reach the input
    purifier = ssni.DiffPure(tiny_eps_model(), reverse_steps=2)
    d = ssni.Defense(_Detached(), purifier, ssni.Constant(0.05))
    xg = gaussian_images(4, seed=2)
    r = evaluate(d, PGD(ThreatModel("L2", 0.5), iterations=2, eot=2), (xg, torch.arange(4)),
                 seeds=[1], batch_size=4, sanity_samples=4)
    assert any("all-zero input gradient" in w for w in r.warnings)


def _helper_env(sleep):
    env = dict(os.environ, SLEEP_PER_CALL=str(sleep), OMP_NUM_THREADS="1")
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_sigkill_and_restart_give_the_same_report(tmp_path):
    killed_log, clean_log = tmp_path / "killed.jsonl", tmp_path / "clean.jsonl"
    clean = subprocess.Popen(
        [sys.executable, str(HELPER), str(clean_log), str(tmp_path / "clean.json")],
        env=_helper_env(0),
    )
    victim = subprocess.Popen(
        [sys.executable, str(HELPER), str(killed_log), str(tmp_path / "never.json")],
        env=_helper_env(0.05),
    )
    total = 2 * 12  # seeds x samples in the helper
    deadline = time.time() + 120
    while True:
        assert victim.poll() is None, "the evaluation finished before it could be killed"
        assert time.time() < deadline, "the evaluation wrote no progress"
        if killed_log.exists():
            done = sum('"kind": "sample"' in s for s in killed_log.read_text().splitlines())
            if done >= 5:
                break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = sum(line["kind"] == "sample" for line in _log_lines_lenient(killed_log))
    assert 0 < done < total
    assert not (tmp_path / "never.json").exists()
    subprocess.run(
        [sys.executable, str(HELPER), str(killed_log), str(tmp_path / "resumed.json")],
        env=_helper_env(0), check=True, timeout=300,
    )
    assert clean.wait(timeout=300) == 0
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    reference = json.loads((tmp_path / "clean.json").read_text())
    assert resumed == reference
    keys = [(r["seed"], r["index"]) for r in _log_lines(killed_log) if r["kind"] == "sample"]
    assert len(keys) == len(set(keys)) == total


def _log_lines_lenient(path):
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out
