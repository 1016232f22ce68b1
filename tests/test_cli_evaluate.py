"""Command line: presets, evaluate end to end on CPU, report merging, exit codes."""

import csv
import json
import sys
from pathlib import Path

import pytest

from ssni.cli.main import main

sys.path.insert(0, str(Path(__file__).parent))
from _cli_helpers import tiny_sets, tiny_weights  # noqa: E402

ROW = "fmnist-diffpure-ssni-n-pgd-linf"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights(tmp_path_factory.mktemp("weights"))


def test_presets_lists_every_row_with_one_line(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [line.split()[0] for line in lines]
    assert sum(n.startswith("cifar10-") for n in names) >= 18
    assert sum(n.startswith("imagenet-") for n in names) >= 3
    fmnist = [n for n in names if n.startswith("fmnist-")]
    assert {n.split("-")[1] for n in fmnist} == {"diffpure", "gdmp", "gns"}
    assert all(len(line.split()) > 1 for line in lines)  # every row has a description
    assert main(["presets", "--show", ROW]) == 0
    assert 'policy = "ssni-n"' in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, key",
    [
        (["--set", "bogus=1"], "bogus"),
        (["--set", "n=many"], "n"),
        (["--set", "eps=-0.03"], "eps"),
        (["--set", "t_star=0"], "t_star"),
        (["--set", "t_star=1.2"], "t_star"),
        (["--set", "votes=0"], "votes"),
        (["--set", "score_model_path=/nonexistent/unet.safetensors"], "score_model_path"),
        (["--set", "dataset=cifar10", "--set", "score_model=cifar10-ddpmpp"], "score_model_path"),
        (["--set", "policy_file=/nonexistent/policy.json"], "policy_file"),
        (["--preset", "no-such-preset"], "preset"),
        (["--preset", "cifar10-gns-ssni-l-pgd-l2", "--set", "device=cpu"], "score_model_path"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(tmp_path, capsys, extra, key):
    args = ["evaluate", "--preset", ROW, *extra, "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f": {key}:" in err


def test_runtime_failure_exits_1(tmp_path, capsys, weights):
    s, c = weights
    bad = tmp_path / "empty"
    bad.mkdir()  # no Fashion-MNIST files here
    args = ["--quiet", "evaluate", "--preset", ROW, *tiny_sets(s, c, data_dir=bad),
            "--out", str(tmp_path / "o")]
    assert main(args) == 1
    assert "failed" in capsys.readouterr().err


def test_evaluate_end_to_end_and_report(tmp_path, capsys, weights, fashion_mnist):
    s, c = weights
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    assert main(["--quiet", "evaluate", "--preset", ROW, *tiny_sets(s, c), "--out", str(run1)]) == 0
    for name in ("report.json", "report.csv", "report.md", "config.toml", "log.jsonl",
                 "score_norms.png", "t_hist.png"):
        assert (run1 / name).is_file(), name
    doc = json.loads((run1 / "report.json").read_text())
    assert [r["seed"] for r in doc["rows"]] == [121, 122]
    row = doc["rows"][0]
    assert row["config"]["n"] == 16 and row["config"]["policy"] == "ssni-n"
    assert 0 <= row["metrics"]["clean_acc"] <= 1 and 0 <= row["metrics"]["robust_acc"] <= 1
    with open(run1 / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == 1  # one configuration
    assert "n = 16" in (run1 / "config.toml").read_text()
    # a second run of the same row with another seed, then the comparison table
    assert main(["--quiet", "evaluate", "--preset", ROW, *tiny_sets(s, c, seeds=123),
                 "--out", str(run2)]) == 0
    capsys.readouterr()
    assert main(["report", str(run1), str(run2), "--out", str(tmp_path / "table")]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) == 2 and ROW in table[1] and "| 3 |" in table[1]  # 3 seeds merged
    assert "±" in table[1]
    assert (tmp_path / "table" / "report.csv").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_shipped_weights_row_runs(tmp_path, fashion_mnist):
    args = ["--quiet", "evaluate", "--preset", ROW, "--set", "n=16", "--set", "seeds=121",
            "--set", "stats_n=32", "--set", "iterations=1", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    doc = json.loads((tmp_path / "run" / "report.json").read_text())
    assert doc["rows"][0]["config"]["score_model"] == "fmnist-unet"


def test_weights_are_found_in_cwd_first_then_in_the_package(tmp_path, monkeypatch, weights):
    import shutil

    import ssni
    from ssni.io.weights import SHIPPED_WEIGHTS, find_weights

    monkeypatch.chdir(tmp_path)
    package = Path(ssni.__file__).parent / "weights"
    for filename, _ in SHIPPED_WEIGHTS.values():
        assert find_weights(filename) == package / filename
    (tmp_path / "weights").mkdir()
    local = tmp_path / "weights" / "fmnist_cnn.safetensors"
    shutil.copy(weights[1], local)
    assert find_weights("fmnist_cnn.safetensors") == local
    with pytest.raises(FileNotFoundError, match="not found"):
        find_weights("no_such_weights.safetensors")
