"""``ssni study``: resumable stages, the t* rule, code identity, packing and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssni.cli import study as st
from ssni.cli import study_report as sr
from ssni.cli.main import main
from ssni.eval.log import RunLog


@pytest.fixture
def tiny(monkeypatch):
    """The study at a toy size: a few images, levels of 1-3 steps, one attack iteration."""
    monkeypatch.setattr(st, "T_GRID", (0.001, 0.002, 0.003, 0.004, 0.005))
    monkeypatch.setattr(st, "CLEAN_N", 4)
    monkeypatch.setattr(st, "CLEAN_BATCH", 4)
    monkeypatch.setattr(st, "ROBUST_N", 2)
    monkeypatch.setattr(st, "ANALYZE_N", 2)
    monkeypatch.setattr(st, "STATS_N", 4)
    monkeypatch.setattr(st, "CALIB_N", 2)
    monkeypatch.setattr(st, "ROW_BATCH", 2)
    monkeypatch.setattr(st, "CLEAN_DROP", -1.0)  # the first complete level is t*
    monkeypatch.setattr(st, "CALIB_RESOLUTION", 0.001)
    monkeypatch.setattr(st, "CALIB_BIASES", (0.0, 0.001))
    monkeypatch.setattr(st, "CALIB_ATTACK", (1, 1))
    monkeypatch.setattr(
        st, "BASE", {**st.BASE, "iterations": 1, "eot": 1, "surrogate_steps": 1, "levels": 2}
    )
    real_plan = st.study_plan

    def plan():
        stages = real_plan()
        for s in stages:
            if s.kind == "clean":
                s.spec["levels"] = [0.001, 0.002] if s.name == "clean-decisive" else [0.003]
        return stages

    monkeypatch.setattr(st, "study_plan", plan)


def _write_clean(root: Path, t: float, correct, plain) -> None:
    lg = RunLog(root / "clean" / st.level_name(t) / "log.jsonl", {"stage": "clean", "t": t})
    for i, (c, p) in enumerate(zip(correct, plain)):
        lg.add_sample({"seed": 121, "index": i, "label": 0, "pred": 0, "correct": c,
                       "plain_pred": 0, "plain_correct": p})
    lg.close()


def test_t_star_is_the_smallest_level_losing_enough(tmp_path, monkeypatch):
    monkeypatch.setattr(st, "CLEAN_N", 10)
    plain = [True] * 10
    _write_clean(tmp_path, 0.05, [True] * 10, plain)
    assert st.choose_t_star(tmp_path).t_star is None  # 0.1 not run: undecided
    _write_clean(tmp_path, 0.1, [True] * 9 + [False], plain)  # drop 10 points >= 4
    _write_clean(tmp_path, 0.2, [False] * 10, plain)
    assert st.choose_t_star(tmp_path).t_star == 0.1
    # a partial smaller level blocks the decision
    _write_clean(tmp_path / "b", 0.05, [True] * 5, plain[:5])
    _write_clean(tmp_path / "b", 0.1, [False] * 10, plain)
    choice = st.choose_t_star(tmp_path / "b")
    assert choice.t_star is None and "5/10" in choice.reason


def test_paired_interval_uses_the_same_images(tmp_path):
    a, b = sr.Row("a", tmp_path), sr.Row("b", tmp_path)
    a.by_seed = {121: [{"index": i, "robust": i < 6} for i in range(10)]}
    b.by_seed = {121: [{"index": i, "robust": i < 3} for i in range(10)],
                 122: [{"index": 0, "robust": True}]}
    m, lo, hi, n, seeds = sr.paired(a, b, "robust")
    assert (n, seeds) == (10, [121]) and m == pytest.approx(0.3)
    assert lo < 0.3 < hi


def test_code_identity_refuses_other_code(tmp_path):
    d = tmp_path / "stage"
    first = st.check_identity(d, "clean", False)
    assert st.check_identity(d, "clean", False)["code"] == first["code"]
    doc = json.loads((d / "identity.json").read_text())
    doc["code"] = "0" * 16
    (d / "identity.json").write_text(json.dumps(doc))
    with pytest.raises(st.StudyError, match="--accept-code-change"):
        st.check_identity(d, "clean", False)
    accepted = st.check_identity(d, "clean", True)
    assert accepted["code"] == first["code"] and accepted["history"]


def test_fingerprint_ignores_docstrings_and_comments():
    import ast

    a = ast.parse('def f(x):\n    """Doc."""\n    # note\n    return x + 1\n')
    b = ast.parse("def f(x):\n    return x + 1\n")
    c = ast.parse("def f(x):\n    return x + 2\n")
    dump = [ast.dump(st._strip_docstrings(t), annotate_fields=False) for t in (a, b, c)]
    assert dump[0] == dump[1] != dump[2]


@pytest.mark.slow
def test_study_runs_resumes_packs_and_reports(tiny, tmp_path):
    out = tmp_path / "run"
    rows = ["diffpure-constant-pgd-eps0.100/seed121", "diffpure-ssni-n-pgd-eps0.100/seed121"]
    only = ["--only", "clean-decisive", "--only", "calibrate", "--only", rows[0], "--only", rows[1],
            "--only", "analyze-t"]
    assert main(["study", "run", "--out", str(out), *only]) == 0
    row = out / "rows" / "diffpure-ssni-n-pgd-eps0.100" / "seed121" / "log.jsonl"
    assert len(st.read_log(row)[1]) == 2
    assert (out / "calibrate" / "ssni-n" / "policy.json").is_file()
    adv_grid = st.read_log(out / "analyze-t" / "log.jsonl")[1]
    assert len(adv_grid) == 2 and len(adv_grid[0]["adv"]) == len(st.T_GRID)
    logs = {p: p.read_bytes() for p in out.rglob("log.jsonl")}
    # a second run has nothing to do and leaves every log as it was
    assert main(["study", "run", "--out", str(out), *only]) == 0
    assert {p: p.read_bytes() for p in out.rglob("log.jsonl")} == logs
    # a killed run: the last chunk of a log is lost and redone identically
    text = row.read_text().splitlines(keepends=True)
    row.write_text("".join(text[:-2]) + text[-2][:10])
    assert main(["study", "run", "--out", str(out), *only]) == 0
    assert row.read_bytes() == logs[row]
    # packed logs regenerate the same document, and a run resumes from them
    packed = tmp_path / "packed"
    st.pack(out, packed)
    assert not list(packed.rglob("log.jsonl")) and list(packed.rglob("log.jsonl.gz"))
    docs = [sr.write_results(root, tmp_path / f"d{k}" / "RESULTS.md", tmp_path / f"d{k}" / "fig")
            for k, root in enumerate((out, packed))]
    texts = [d[0].read_text().split("\n", 5)[5] for d in docs]  # drop the generation time
    assert texts[0] == texts[1]
    assert "SSNI-N - constant | 121 | 2 |" in texts[0]
    assert "| not run |" in texts[0] and "partial (seed 121: 2/2)" in texts[0]
    again = tmp_path / "again"
    assert main(["study", "run", "--out", str(again), "--resume-from", str(packed), *only]) == 0
    resumed = again / "rows" / "diffpure-ssni-n-pgd-eps0.100" / "seed121" / "log.jsonl"
    assert resumed.read_bytes() == logs[row]


def test_sessions_count_the_last_line_of_each_session(tmp_path, monkeypatch):
    monkeypatch.setattr(st, "HEARTBEAT_S", 0.05)
    n = {"done": 0}
    with st.accounted(tmp_path, "s", lambda: n["done"]):
        import time

        n["done"] = 3
        time.sleep(0.3)
        n["done"] = 5
    with st.accounted(tmp_path, "s", lambda: n["done"]):
        n["done"] = 6
    lines = (tmp_path / "sessions.jsonl").read_text().splitlines()
    assert len(lines) > 2  # heartbeats, then the final lines
    agg = sr.sessions(tmp_path)["s"]
    assert agg["samples"] == 6 and agg["sessions"] == 2


def test_changed_code_resumes_a_stage_only_if_its_first_chunk_replays(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(st, "CLEAN_BATCH", 2)
    out = tmp_path / "run"
    assert main(["study", "run", "--out", str(out), "--only", "clean-decisive"]) == 0
    d = out / "clean" / st.level_name(0.001)
    full = (d / "log.jsonl").read_text().splitlines(keepends=True)

    def other_code_and_lost_chunk(edit=None):
        lines = list(full[:-2])  # the second chunk is lost
        if edit:
            lines[1] = edit(lines[1])
        (d / "log.jsonl").write_text("".join(lines))
        doc = json.loads((d / "identity.json").read_text())
        (d / "identity.json").write_text(json.dumps({**doc, "code": "0" * 16}))

    other_code_and_lost_chunk()
    assert main(["study", "run", "--out", str(out), "--only", "clean-decisive"]) == 0
    assert (d / "log.jsonl").read_text() == "".join(full)
    history = json.loads((d / "identity.json").read_text())["history"]
    assert "replays identically" in history[-1]["how"]
    flip = '"correct": false' if '"correct": true' in full[1] else '"correct": true'
    other_code_and_lost_chunk(lambda line: line.replace('"correct": true', flip)
                              .replace('"correct": false', flip))
    assert main(["study", "run", "--out", str(out), "--only", "clean-decisive"]) == 1
