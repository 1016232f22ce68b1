"""Reports: ROC AUC without scikit-learn, summaries over seeds, report files, merges, figures."""

import csv
import json

import numpy as np
import pytest

from ssni.eval import reports


def _row(name, seed, clean, robust, **config):
    return {
        "name": name,
        "seed": seed,
        "metrics": {"clean_acc": clean, "robust_acc": robust},
        "config": {"dataset": "fashion-mnist", "policy": "constant", "seeds": [seed], **config},
    }


def test_roc_auc_matches_scikit_learn_with_ties():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    clean = np.round(rng.normal(0, 1, 50), 1)
    adv = np.round(rng.normal(0.7, 1, 40), 1)
    labels = np.r_[np.zeros(50), np.ones(40)]
    expected = sklearn_metrics.roc_auc_score(labels, np.r_[clean, adv])
    assert reports.roc_auc(clean, adv) == pytest.approx(expected, abs=1e-12)
    assert reports.roc_auc([0, 1], [2, 3]) == 1.0
    assert reports.roc_auc([2, 3], [0, 1]) == 0.0
    assert reports.roc_auc([1, 1], [1, 1]) == 0.5


def test_summarize_mean_std_over_seeds_and_labels_for_same_name():
    rows = [_row("a", 1, 0.8, 0.4), _row("a", 2, 0.6, 0.2), _row("a", 3, 0.9, 0.5, n=8)]
    summary = reports.summarize(rows)
    assert len(summary) == 2
    first = summary[0]
    assert first["seeds"] == [1, 2]
    assert first["metrics"]["clean_acc"]["mean"] == pytest.approx(0.7)
    assert first["metrics"]["clean_acc"]["std"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert summary[1]["label"] != first["label"]  # disambiguated by the differing key
    assert "n=8" in summary[1]["label"]


def test_write_report_files_and_merge(tmp_path):
    run1, run2 = tmp_path / "r1", tmp_path / "r2"
    reports.write_report(run1, [_row("a", 1, 0.8, 0.4), _row("b", 1, 0.7, 0.3)])
    reports.write_report(run2, [_row("a", 2, 0.6, 0.2)])
    doc = json.loads((run1 / "report.json").read_text())
    assert doc["rows"][0]["seed"] == 1 and doc["rows"][0]["config"]["dataset"] == "fashion-mnist"
    with open(run1 / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == ["a", "b"]
    assert float(table[0]["clean_acc_mean"]) == pytest.approx(0.8)
    assert "| a |" in (run1 / "report.md").read_text()
    merged = reports.merge_reports([run1, run2, run2])  # a repeated run counts once
    a = next(e for e in merged if e["name"] == "a")
    assert a["seeds"] == [1, 2]
    assert a["metrics"]["robust_acc"]["mean"] == pytest.approx(0.3)
    text = reports.markdown_table(merged)
    assert "70.0 ± 14.1" in text  # clean acc of 'a' in percent, mean ± std


def test_figures_are_written(tmp_path):
    rng = np.random.default_rng(1)
    clean, adv = rng.normal(0, 1, 30), rng.normal(1, 1, 30)
    p1 = reports.plot_score_norm_hist(clean, adv, tmp_path / "a.png")
    p2 = reports.plot_t_hist({"clean": rng.integers(40, 60, 30) / 1000,
                              "adv": rng.integers(80, 110, 30) / 1000}, tmp_path / "b.png",
                             t_star=0.1)
    p3 = reports.plot_accuracy_vs_t([0.05, 0.1, 0.2], {"clean": [0.9, 0.8, 0.5]},
                                    tmp_path / "c.png", t_star=0.1)
    correct = rng.random((12, 3)) > 0.5
    p4 = reports.plot_t_map([0.05, 0.1, 0.2], {"clean": (correct, rng.random(12) * 0.2),
                                               "adv": (correct, None)}, tmp_path / "d.png")
    for p in (p1, p2, p3, p4):
        assert p.read_bytes()[:4] == b"\x89PNG"
