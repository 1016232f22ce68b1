"""One writer per results folder: the lock, stale locks, and two runs on one folder."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ssni.io.lock import LOCK_NAME, FileLock, FolderLock, LockError, folder_lock

HOLDER = textwrap.dedent(
    """
    import sys, time
    from ssni.io.lock import folder_lock
    lock = folder_lock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)


def _holder(folder):
    """A subprocess holding the lock of ``folder`` (returned once it holds it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_lock_fails_at_once_naming_the_folder_and_pid(tmp_path):
    with folder_lock(tmp_path / "run"):
        assert (tmp_path / "run" / LOCK_NAME).read_text().split()[0] == str(os.getpid())
        with pytest.raises(LockError) as err:
            FolderLock(tmp_path / "run").acquire()
        msg = str(err.value)
        assert str(tmp_path / "run") in msg and f"pid {os.getpid()}" in msg
        assert "\n" not in msg
    # released: the lock file is gone and the lock can be taken again
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    with folder_lock(tmp_path / "run"):
        pass


def test_a_refused_run_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError):
        with folder_lock(out):
            raise RuntimeError("checks failed")
    assert not out.exists()
    with folder_lock(out):
        (out / "result.txt").write_text("x")
    assert (out / "result.txt").is_file() and sorted(os.listdir(out)) == ["result.txt"]


def test_lock_of_a_live_process_blocks_and_of_a_killed_one_is_stale(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(LockError, match=f"pid {proc.pid}"):
            folder_lock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the dead owner's lock file is still there, with its pid, but nobody holds it
    assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(proc.pid)
    with folder_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(os.getpid())


def test_file_lock_on_a_deleted_file_is_not_taken(tmp_path):
    # A holder releasing (unlinking) between another process's open and lock must not leave
    # two owners: after release a new lock works on a fresh file.
    a = FileLock(tmp_path / "x.lock").acquire()
    a.release()
    b = FileLock(tmp_path / "x.lock").acquire()
    with pytest.raises(LockError):
        FileLock(tmp_path / "x.lock").acquire()
    b.release()


def test_second_cli_run_on_a_held_folder_exits_1_with_one_line(tmp_path, capsys):
    from ssni.cli.main import main

    out = tmp_path / "run"
    proc = _holder(out)
    try:
        code = main(["evaluate", "--set", "dataset=digits", "--out", str(out)])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and str(out) in err and f"pid {proc.pid}" in err
    assert sorted(os.listdir(out)) == [LOCK_NAME]  # nothing written beside the lock


def test_an_open_evaluation_log_has_one_writer(tmp_path):
    from ssni.eval.log import RunLog

    path = tmp_path / "log.jsonl"
    first = RunLog(path, {"a": 1})
    try:
        with pytest.raises(LockError, match="log.jsonl"):
            RunLog(path, {"a": 1})
    finally:
        first.close()
    RunLog(path, {"a": 1}).close()  # free again once closed
