"""``ssni study``: resumable stages, the t* rule, code identity, packing and the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssni.cli import study as st
from ssni.cli import study_report as sr
from ssni.cli.main import main
from ssni.eval.log import RunLog

sys.path.insert(0, str(Path(__file__).parent))
from _study_toy import WIDE, shrink  # noqa: E402
from _torchrun import worker  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def tiny(monkeypatch):
    """The study at a toy size: a few images, levels of 1-3 steps, one attack iteration."""
    shrink(monkeypatch.setattr)


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


def test_clean_loss_is_paired_with_the_classifier_alone(tmp_path):
    const, ssni = sr.Row("c", tmp_path), sr.Row("s", tmp_path)
    assert sr.clean_loss(tmp_path, const, ssni) is None  # undefended stage not run
    lg = RunLog(tmp_path / "undefended" / f"pgd-eps{st.EPS_MAIN:.3f}" / "log.jsonl", {"u": 1})
    for i in range(4):  # the classifier alone is right on images 0-2
        lg.add_sample({"seed": 121, "index": i, "clean_correct": i < 3, "robust": False})
    lg.close()
    # constant is right on image 0 at both seeds, on image 1 at seed 121 only
    const.by_seed = {121: [{"index": i, "clean_correct": i < 2} for i in range(4)],
                     122: [{"index": i, "clean_correct": i < 1} for i in range(4)]}
    ssni.by_seed = {121: [{"index": i} for i in range(4)], 122: [{"index": 0}]}
    # image 0: 0 lost; 1: 1 - 1 at seed 121 only (the seed both rows have); 2: 1; 3: 0
    assert sr.clean_loss(tmp_path, const, ssni) == (pytest.approx(0.25), 4)
    ssni.by_seed = {122: [{"index": i} for i in range(4)]}  # seed 122: images 1, 2 lost
    assert sr.clean_loss(tmp_path, const, ssni) == (pytest.approx(0.5), 4)


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


def test_identity_keeps_a_stage_on_one_device_family(tmp_path, monkeypatch):
    d = tmp_path / "stage"
    first = st.check_identity(d, "clean", False)
    assert first["device"] == "cpu"
    doc = json.loads((d / "identity.json").read_text())
    del doc["device"]  # identities written before the device was recorded: CPU runs
    (d / "identity.json").write_text(json.dumps(doc))
    assert st.check_identity(d, "clean", False)["code"] == first["code"]
    monkeypatch.setattr(st, "_DEVICE", "cuda:1")
    with pytest.raises(st.StudyError, match="device versions"):
        st.check_identity(d, "clean", False)
    assert st.check_identity(d, "clean", False, verify=lambda: True)["device"] == "cuda"
    assert st.base_config().device == "cuda:1"


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
    # the rows' gradient passes run under the study's autocast, recorded in the row's config
    assert f'attack_autocast = "{st.ROW_AUTOCAST}"' in (row.parent / "config.toml").read_text()
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
    # packed result files name the study folder by a mark, not by the run's absolute path
    packed_cfg = (packed / row.parent.relative_to(out) / "config.toml").read_text()
    assert str(out.resolve()) in (row.parent / "config.toml").read_text()
    assert str(out.resolve()) not in packed_cfg
    assert f'"{st.STUDY_MARK}/calibrate/ssni-n/policy.json"' in packed_cfg
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


# ----------------------------------------------------------------------------- torchrun

ROWS = ["diffpure-constant-pgd-eps0.100/seed121", "diffpure-ssni-n-pgd-eps0.100/seed121"]
#: One stage of every kind: clean, undefended, calibration table and choice, rows, adv-grid.
WIDE_ONLY = [a for o in ("clean-decisive", "undefended-pgd-eps0.100", "calibrate", *ROWS,
                         "analyze-t") for a in ("--only", o)]


def _records(out: Path):
    """``{stage folder: {(seed, index): record}}`` over every log; a sample in two logs of a
    folder fails (computed twice)."""
    found = {}
    for path in sorted(out.rglob("log*.jsonl")):
        recs = found.setdefault(path.parent.relative_to(out).as_posix(), {})
        for line in path.read_text().splitlines()[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed rank
                continue
            if rec["kind"] == "sample":
                key = (rec["seed"], rec["index"])
                assert key not in recs, f"{path.parent}: {key} computed twice"
                recs[key] = rec["record"]
    return found


def _ranks_with_samples(folder: Path):
    return {p.name for p in folder.glob("log*.jsonl") if '"kind": "sample"' in p.read_text()}


def _single(out: Path) -> int:
    """The wide toy study in this process, with one CPU thread as each torchrun process has."""
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp:
            shrink(mp.setattr, WIDE)
            return main(["--quiet", "study", "run", "--out", str(out), "--threads", "1",
                         *WIDE_ONLY])
    finally:
        torch.set_num_threads(threads)


def _torchrun(out: Path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("_study_toy.py")), "--wide", "--quiet", "study", "run",
           "--out", str(out), "--threads", "1", *WIDE_ONLY]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _report(out: Path, row: str):
    """A row's report.json without its time and with the study folder (in the policy file's
    path) as ``OUT``."""
    text = (out / "rows" / row / "report.json").read_text()
    doc = json.loads(text.replace(str(out.resolve()), "OUT"))
    doc["extra"].pop("seconds")
    return doc


@pytest.fixture(scope="module")
def wide_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("study-single") / "run"
    assert _single(out) == 0
    return out


@pytest.mark.slow
def test_study_under_torchrun_equals_one_process(wide_reference, tmp_path):
    out = tmp_path / "run"
    proc = _torchrun(out)
    text = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, text
    ref = _records(wide_reference)
    assert _records(out) == ref and len(ref) == 7  # 2 clean levels, 5 other stages
    assert not (out / "log.jsonl").exists()
    for folder in ref:  # the ranks shared every stage (clean: the levels of each chunk)
        ranks = _ranks_with_samples(out / folder)
        assert ranks == ({"log.rank0.jsonl"} if folder == "clean/t0.001" else
                         {"log.rank1.jsonl"} if folder == "clean/t0.002" else
                         {"log.rank0.jsonl", "log.rank1.jsonl"}), folder
    for name in ("ssni-n/policy.json", "ssni-l/policy.json", "ssni-n/calibration.json"):
        assert (out / "calibrate" / name).read_text() == (
            wide_reference / "calibrate" / name).read_text()
    for row in ROWS:
        assert _report(out, row) == _report(wide_reference, row)
    sessions = [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines()]
    assert len(sessions) == 7 and all(s["ranks"] == 2 and s["final"] for s in sessions)
    identities = [sorted(p.relative_to(root) for p in root.rglob("identity.json"))
                  for root in (out, wide_reference)]
    assert identities[0] == identities[1] and len(identities[0]) == 8  # and calibrate/
    # readers merge the rank logs, also packed: the records and their order of one process
    packed = tmp_path / "packed"
    st.pack(out, packed)
    assert len(list(packed.rglob("log.rank*.jsonl.gz"))) == 14
    for folder in ref:
        assert st.read_log(packed / folder / "log.jsonl") == st.read_log(
            wide_reference / folder / "log.jsonl")
    for row in ROWS:
        name = row.split("/")[0]
        assert sr.Row(name, packed).by_seed == sr.Row(name, wide_reference).by_seed
    # one process on the same folder finds every stage done and writes no log
    logs = {p: p.read_bytes() for p in out.rglob("log*.jsonl")}
    assert _single(out) == 0
    assert {p: p.read_bytes() for p in out.rglob("log*.jsonl")} == logs


@pytest.mark.slow
def test_study_killed_under_torchrun_resumes_with_one_process(wide_reference, tmp_path):
    out = tmp_path / "run"
    proc = _torchrun(out)
    victim = None
    deadline = time.time() + 240
    while victim is None:  # rank 1 dies after its first clean chunk
        assert proc.poll() is None, proc.communicate()[0].decode()
        assert time.time() < deadline, "rank 1 wrote no sample"
        if any('"kind": "sample"' in p.read_text() for p in out.glob("clean/*/log.rank1.jsonl")):
            victim = worker(proc.pid, rank=1)
        else:
            time.sleep(0.02)
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    before = _records(out)
    ref = _records(wide_reference)
    assert 0 < sum(map(len, before.values())) < sum(map(len, ref.values()))
    assert _single(out) == 0  # world size 1 finishes what the ranks left
    after = _records(out)  # (fails if a finished sample was computed again)
    assert after == ref
    assert all(after[f][k] == rec for f, recs in before.items() for k, rec in recs.items())
    for row in ROWS:
        assert _report(out, row) == _report(wide_reference, row)
