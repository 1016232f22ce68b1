"""The results folder of a command: one writer at a time (see :mod:`ssni.io.lock`)."""

from __future__ import annotations

import functools

from ..io.lock import folder_lock

__all__ = ["locks_out"]


def locks_out(command):
    """Run ``command(args)`` holding the lock of ``args.out`` (if set) for its whole duration;
    a second command on the same folder fails at once with a one-line ``LockError``."""

    @functools.wraps(command)
    def wrapper(args) -> int:
        if not getattr(args, "out", None):
            return command(args)
        with folder_lock(args.out):
            return command(args)

    return wrapper
