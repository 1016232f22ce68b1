"""Process-level memory setting of the CLI (never called by library code).

With glibc's default dynamic mmap threshold, the activation buffers that a checkpointed
full-gradient attack frees are recycled inside the heap and stay resident behind the few small
tensors each reverse step keeps for the backward pass, so the resident set grows with the number
of reverse steps although live memory does not. :func:`map_large_buffers` sets the threshold to a
fixed 64 KiB for this process (what ``MALLOC_MMAP_THRESHOLD_=65536`` does): large buffers are then
mapped and unmapped on free and the resident set follows live memory. It costs page faults on
every large allocation, so the CLI uses it for full-gradient attacks only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["map_large_buffers", "MMAP_THRESHOLD"]

MMAP_THRESHOLD = 65536
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def map_large_buffers(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold for this process; False where it does not apply (not Linux,
    not glibc, or ``MALLOC_MMAP_THRESHOLD_`` already set by the user)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))
