"""Nothing written before the checks pass, nothing half-written, damaged logs repaired on request,
sanity warnings and progress visible."""

import json
import logging
import sys
from pathlib import Path

import pytest

from ssni.cli.main import main
from ssni.eval.log import LogDamaged, RunLog

sys.path.insert(0, str(Path(__file__).parent))
from _cli_helpers import tiny_sets, tiny_weights  # noqa: E402
from test_evaluate import _log_lines, _small_eval  # noqa: E402

PRESET = "fmnist-diffpure-ssni-n-pgd-linf"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights(tmp_path_factory.mktemp("weights"))


def _run(weights, out, *extra):
    sets = tiny_sets(*weights, dataset="digits", score_model="file", classifier="file",
                     n=8, stats_n=8, seeds="121", batch_size=4)
    return main(["--quiet", "evaluate", "--preset", PRESET, *sets, *extra, "--out", str(out)])


# ----------------------------------------------------------------------------- damaged logs


def _damage(log, line_no, text=b'{"kind": "sample", "seed": 1, "ind\n'):
    lines = log.read_bytes().split(b"\n")
    lines.insert(line_no - 1, text.rstrip(b"\n"))
    log.write_bytes(b"\n".join(lines))


def test_a_damaged_middle_line_is_refused_with_a_way_out_and_repaired_on_request(tmp_path):
    log = tmp_path / "run.jsonl"
    first = _small_eval(log_path=log)
    original = log.read_bytes().split(b"\n")
    _damage(log, 6)  # a fragment from a concurrent writer before the 5th sample
    damaged = log.read_bytes()
    with pytest.raises(LogDamaged) as err:
        _small_eval(log_path=log)
    msg = str(err.value)
    assert "line 6 is damaged" in msg and "resume=repair" in msg and "\n" not in msg
    assert log.read_bytes() == damaged  # refusing changes nothing
    repaired = _small_eval(log_path=log, repair_log=True)
    assert repaired.to_dict() == first.to_dict()
    lines = log.read_bytes().split(b"\n")
    assert lines[:5] == original[:5]  # the good prefix is kept byte for byte
    keys = [(r["seed"], r["index"]) for r in _log_lines(log) if r["kind"] == "sample"]
    assert len(keys) == len(set(keys)) == 20


def test_repair_from_the_command_line(weights, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(weights, out) == 0
    report = json.loads((out / "report.json").read_text())
    _damage(out / "log.jsonl", 3)
    assert _run(weights, out) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "line 3 is damaged" in err and "resume=repair" in err
    assert _run(weights, out, "--set", "resume=repair") == 0
    again = json.loads((out / "report.json").read_text())
    assert again["rows"][0]["metrics"] == report["rows"][0]["metrics"]


def test_a_log_without_samples_of_another_configuration_is_started_anew(tmp_path):
    log = tmp_path / "run.jsonl"
    RunLog(log, {"attack": "old"}).close()  # a run that failed before its first sample
    report = _small_eval(log_path=log)
    assert _log_lines(log)[0]["config"] == report.config
    with pytest.raises(ValueError, match="another configuration"):
        _small_eval(log_path=log, votes=1)  # this one has samples: refused


# ----------------------------------------------------------------------------- nothing written


def test_a_refused_run_leaves_another_runs_results_untouched(weights, tmp_path):
    out = tmp_path / "run"
    assert _run(weights, out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    # another configuration on the same folder: refused by the log check, nothing rewritten
    assert _run(weights, out, "--set", "policy=constant") == 1
    # bad weights: refused before anything else
    assert _run(weights, out, "--set", f"classifier_path={weights[0]}") == 2
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before
    assert "ssni-n" in before["config.toml"].decode()


def test_replacing_keeps_the_old_file_when_writing_fails(tmp_path):
    from ssni.io.files import replacing, write_text_atomic

    path = write_text_atomic(tmp_path / "report.md", "old\n")
    with pytest.raises(RuntimeError):
        with replacing(path) as tmp:
            tmp.write_text("half a rep")
            raise RuntimeError("killed")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


# ----------------------------------------------------------------------------- not silent


def test_sanity_warnings_are_listed_in_report_md(tmp_path):
    from ssni.eval.reports import write_report

    rows = [{"name": "a", "seed": 1, "metrics": {"clean_acc": 1.0}, "config": {}}]
    paths = write_report(tmp_path, rows, extra={"warnings": ["EOT = 1 on a stochastic defense"]})
    text = paths["md"].read_text()
    assert "## Warnings" in text and "- EOT = 1 on a stochastic defense" in text
    write_report(tmp_path, rows, extra={"warnings": []})
    assert "Warnings" not in paths["md"].read_text()


def test_cli_report_md_carries_the_run_warnings(weights, tmp_path):
    out = tmp_path / "run"
    assert _run(weights, out) == 0
    warnings = json.loads((out / "report.json").read_text())["extra"]["warnings"]
    assert warnings, "the tiny run is attacked with EOT 1: expected a sanity warning"
    md = (out / "report.md").read_text()
    assert all(w in md for w in warnings)


def test_long_loops_report_progress_in_logs(caplog):
    from ssni.cli.progress import Progress

    caplog.set_level(logging.INFO, logger="ssni.cli")
    bar = Progress(10, "calibrate: attack", quiet=False, every=0.0)
    for _ in range(5):
        bar(2)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "calibrate: attack: 0/10"
    assert any(m.startswith("calibrate: attack: 10/10") for m in lines)
    caplog.clear()
    Progress(10, "quiet", quiet=True, every=0.0)(10)
    assert not caplog.records
