"""One writer per results folder (or per file): an exclusive lock with the owner's pid.

:class:`FileLock` holds an exclusive, non-blocking lock on a lock file (``fcntl.flock`` on POSIX,
``msvcrt.locking`` on Windows) and writes the owner's pid and host into it. The operating system
drops the lock when the owner exits or dies (``kill -9`` included), so a lock file left behind by
a dead run is stale and is simply taken over; there is no timeout and no pid guessing. A live
owner makes a second :meth:`FileLock.acquire` fail at once with :class:`LockError`, whose
one-line message names the folder (or file) and the owner's pid.

:func:`folder_lock` locks a results folder through ``<folder>/.ssni.lock``::

    with folder_lock(out):          # LockError if another process holds it
        ...                         # every write into ``out`` happens here

A folder the lock created is removed again on release when nothing else was written into it,
so a run refused before writing leaves no trace.

Multi-process runs (e.g. ``torchrun``): one process of the run, rank 0, takes the folder lock
before any rank writes and keeps it until every rank is done (a barrier before releasing); the
other ranks wait for rank 0's verdict (a broadcast) and stop if it failed. Each rank writing its
own file (``log.rank{r}.jsonl``) additionally holds that file's lock (``evaluate(log_path=...)``
does this by itself), so even a mis-launched second job cannot interleave lines.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Optional, Union

__all__ = ["LockError", "FileLock", "FolderLock", "folder_lock", "LOCK_NAME"]

PathLike = Union[str, "os.PathLike[str]"]

#: Name of the lock file inside a locked folder.
LOCK_NAME = ".ssni.lock"

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
    import msvcrt


class LockError(RuntimeError):
    """The folder or file is held by another live process (message: one line with its pid)."""

    def __init__(self, what: str, owner: str) -> None:
        self.what = what
        self.owner = owner
        super().__init__(
            f"{what} is in use by another run ({owner}); wait for it to finish or use another "
            "folder"
        )


def _try_lock(fd: int) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            return False
        return True
    try:  # pragma: no cover - Windows: lock one byte far beyond the pid text
        os.lseek(fd, 1 << 20, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:  # pragma: no cover
        return False
    return True  # pragma: no cover


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:  # pragma: no cover - Windows
        os.lseek(fd, 1 << 20, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _owner(fd: int, attempts: int = 20, wait: float = 0.05) -> str:
    """The holder's "pid host" text; the holder writes it just after locking, so an empty file
    is read again a few times before giving up."""
    text: list = []
    for i in range(attempts):
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 256).decode("utf-8", "replace").split()
        except OSError:
            text = []
        if text:
            break
        if i + 1 < attempts:
            time.sleep(wait)
    if not text:
        return "pid unknown"
    return f"pid {text[0]}" + (f" on {text[1]}" if len(text) > 1 else "")


class FileLock:
    """Exclusive lock on the file ``path`` (created if missing; removed on release).

    Args:
        path: the lock file.
        name: what error messages call the locked thing (default: ``path``).

    Not re-entrant: a second ``FileLock`` on the same path, even in the same process, fails.
    """

    def __init__(self, path: PathLike, *, name: Optional[str] = None) -> None:
        self.path = os.fspath(path)
        self.name = name or self.path
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FileLock:
        """Take the lock or raise :class:`LockError` at once (never waits)."""
        if self._fd is not None:
            raise RuntimeError(f"{self.name} is already locked by this object")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                owner = _owner(fd)
                os.close(fd)
                raise LockError(self.name, owner)
            # The previous owner may have unlinked the file between our open and lock: then we
            # hold a lock on a deleted file and must start again on the current one.
            try:
                same = os.path.samestat(os.stat(self.path), os.fstat(fd))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if fcntl is not None:
                os.unlink(self.path)  # while still locked: no one can take a file we delete
        except FileNotFoundError:
            pass
        finally:
            try:
                _unlock(fd)
            finally:
                os.close(fd)
        if fcntl is None:  # pragma: no cover - Windows cannot unlink an open file
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten lock must not outlive its object
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class FolderLock(FileLock):
    """:class:`FileLock` on ``<folder>/.ssni.lock``; creates the folder and, on release, removes
    it again if this lock created it and it is empty."""

    def __init__(self, folder: PathLike) -> None:
        self.folder = Path(folder)
        super().__init__(self.folder / LOCK_NAME, name=str(self.folder))
        self._created = False

    def acquire(self) -> FolderLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"{self.folder} exists and is not a folder")
        created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            super().acquire()
        except BaseException:
            if created:
                _remove_if_empty(self.folder)
            raise
        self._created = created
        return self

    def release(self) -> None:
        was_held = self.held
        super().release()
        if was_held and self._created:
            _remove_if_empty(self.folder)
            self._created = False


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def folder_lock(folder: PathLike) -> FolderLock:
    """An (unacquired) lock on the results folder ``folder``; use it in a ``with`` block."""
    return FolderLock(folder)
