"""Exception types shared by every layer.

``UsageError`` is bad usage or configuration (the CLI exits 2 with its one-line message);
library input checks raise ``ValueError``; checkpoint problems raise
:class:`ssni.io.checkpoints.CheckpointError`.
"""

from __future__ import annotations

__all__ = ["UsageError", "one_line"]


class UsageError(Exception):
    """Bad usage or configuration: exit code 2 with a one-line message."""


def one_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
