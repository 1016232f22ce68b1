"""The demo's code path (three defenses, attacked, report files and figures) on a few images."""

import json
import sys
from pathlib import Path

from ssni.cli.main import main

sys.path.insert(0, str(Path(__file__).parent))
from _cli_helpers import tiny_weights  # noqa: E402


def test_demo_code_path_on_a_few_images(tmp_path, capsys, fashion_mnist):
    score, clf = tiny_weights(tmp_path)
    sets = dict(score_model_path=score, classifier_path=clf, stats_n=8, levels=2,
                purify_steps=2, surrogate_steps=1, iterations=1, eot=1)
    args = ["--quiet", "demo", "--n", "4", "--out", str(tmp_path / "demo")]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0
    out = tmp_path / "demo"
    for name in ("report.json", "report.csv", "report.md", "t_hist.png",
                 "score_norms_ssni-n.png", "score_norms_ssni-l.png"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "report.json").read_text())
    names = [r["name"] for r in doc["rows"]]
    assert names == ["DiffPure + constant", "DiffPure + SSNI-N", "DiffPure + SSNI-L"]
    assert set(doc["extra"]["roc_auc_score_norm"]) == {"SSNI-N", "SSNI-L"}
    printed = capsys.readouterr().out
    assert "ROC AUC of the score norm" in printed and "4 test images" in printed
