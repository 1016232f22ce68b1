"""Evaluation under torchrun: ranks share the chunks, the merged report equals one process's.

Two gloo processes on the CPU run a tiny configuration; the reference runs in this process with
one CPU thread, as torchrun gives each of its processes (OMP_NUM_THREADS=1), since CPU kernels may
round differently with another thread count.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssni.cli.main import main
from ssni.eval.distributed import agree, share
from ssni.eval.log import RunLog, read_log
from ssni.io.lock import LOCK_NAME, folder_lock

sys.path.insert(0, str(Path(__file__).parent))
from _cli_helpers import tiny_sets, tiny_weights  # noqa: E402
from _torchrun import worker  # noqa: E402

ROW = "fmnist-diffpure-ssni-n-pgd-linf"
SRC = str(Path(__file__).resolve().parents[1] / "src")
TOTAL = 32  # 2 seeds x 16 images, in 16 chunks of 2


def _sets(weights):
    return tiny_sets(*weights, batch_size=2, iterations=2)


def _samples(folder):
    """``{(seed, index): record}`` over every log in ``folder``; a sample in two logs fails."""
    out = {}
    for path in sorted(Path(folder).glob("log*.jsonl")):
        for line in path.read_text().splitlines()[1:]:
            rec = json.loads(line)
            if rec["kind"] == "sample":
                key = (rec["seed"], rec["index"])
                assert key not in out, f"{key} computed twice"
                out[key] = rec["record"]
    return out


def _report(folder):
    doc = json.loads((Path(folder) / "report.json").read_text())
    doc["extra"].pop("seconds")
    return doc


def _torchrun(weights, out, nproc):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "ssni", "--quiet", "evaluate", "--preset", ROW,
           *_sets(weights), "--out", str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _single(weights, out):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["--quiet", "evaluate", "--preset", ROW, *_sets(weights), "--out", str(out)]
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def reference(weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    _single(weights, out)
    return out


def test_two_ranks_give_the_single_process_report(weights, reference, tmp_path):
    out = tmp_path / "run"
    with folder_lock(out):  # another run holds the folder: every rank stops, nothing written
        proc = _torchrun(weights, out, 2)
        text = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode != 0 and "in use by another run" in text, text
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    proc = _torchrun(weights, out, 2)
    text = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, text
    assert text.count("| Configuration |") == 1  # rank 0 alone reports
    logs = sorted(p.name for p in out.glob("log*.jsonl"))
    assert logs == ["log.rank0.jsonl", "log.rank1.jsonl"]
    ranks = [read_log(out / name, _config(reference))[0] for name in logs]
    assert [len(r) for r in ranks] == [TOTAL // 2] * 2  # 8 chunks each
    assert _samples(out) == _samples(reference)
    assert _report(out) == _report(reference)
    # one process on the same folder finds everything done and changes no log
    before = {name: (out / name).read_text() for name in logs}
    _single(weights, out)
    assert {name: (out / name).read_text() for name in logs} == before
    assert _samples(out) == _samples(reference)
    assert _report(out) == _report(reference)


def test_killed_rank_resumes_with_one_process(weights, reference, tmp_path):
    out = tmp_path / "run"
    proc = _torchrun(weights, out, 2)
    victim = None
    deadline = time.time() + 240
    while victim is None:
        assert proc.poll() is None, proc.communicate()[0].decode()
        assert time.time() < deadline, "rank 1 wrote no sample"
        log1 = out / "log.rank1.jsonl"
        if log1.exists() and '"kind": "sample"' in log1.read_text():
            victim = worker(proc.pid, rank=1)
        else:
            time.sleep(0.02)
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=120) != 0  # torchrun stops the job when a rank dies
    assert not (out / "report.json").exists()
    before = _samples(out)
    assert 0 < len(before) < TOTAL, "the kill came after the work was done"
    _single(weights, out)  # world size 1 finishes what the ranks left
    after = _samples(out)  # (fails if a finished sample was computed again)
    assert {k: after[k] for k in before} == before
    assert after == _samples(reference)
    assert _report(out) == _report(reference)


def _config(folder):
    return json.loads((Path(folder) / "log.jsonl").read_text().splitlines()[0])["config"]


def test_logs_of_another_configuration_are_refused(tmp_path):
    path = tmp_path / "log.rank1.jsonl"
    log = RunLog(path, {"a": 1})
    log.add_sample({"seed": 1, "index": 0, "robust": True})
    log.close()
    with open(path, "a") as f:
        f.write('{"kind": "sample", "seed": 1, "in')  # a rank killed while writing
    assert list(read_log(path, {"a": 1})[0]) == [(1, 0)]
    assert path.read_text().endswith('"in')  # read only: the other rank's file is untouched
    assert read_log(tmp_path / "missing.jsonl", {"a": 1}) == ({}, None)
    with pytest.raises(ValueError, match="another configuration"):
        read_log(path, {"a": 2})
    mine = RunLog(tmp_path / "log.rank0.jsonl", {"a": 2})
    with pytest.raises(ValueError, match="another configuration"):
        mine.merge(path)
    mine.close()


def test_round_robin_shares_and_agreement():
    chunks = [(s, c) for s in (1, 2) for c in range(0, 10, 2)]
    parts = [share(chunks, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(chunks)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        share(chunks, 3, 3)
    assert agree(None, lambda: 7) == 7
    with pytest.raises(KeyError):
        agree(None, lambda: {}["x"])


def test_other_commands_refuse_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["presets"]) == 2
    assert "only evaluate and study run start under torchrun" in capsys.readouterr().err
    assert main(["study", "pack", "--out", "x", "--to", "y"]) == 2  # pack and report: one process
