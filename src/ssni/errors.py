"""Exception types shared by every layer.

``UsageError`` is bad usage or configuration (the CLI exits 2 with its one-line message);
library input checks raise ``ValueError``; checkpoint problems raise
:class:`ssni.io.checkpoints.CheckpointError`.
"""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(Exception):
    """Bad usage or configuration: exit code 2 with a one-line message."""
