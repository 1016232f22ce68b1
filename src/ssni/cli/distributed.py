"""Running a command under ``torchrun``: one process group per job, one device per process.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
without them a command runs as a single process. The default group uses nccl when the
configured device is a GPU and gloo on the CPU; a gloo group beside it carries the few Python
objects the ranks exchange (configuration checks, finished records), so waiting for a slow rank
never occupies a GPU. ``device = "cuda"`` means GPU ``LOCAL_RANK`` of the node; an explicit
``cuda:K`` is kept (then the processes of a node share that GPU).
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch

from .config import ConfigError

__all__ = ["Job", "launched", "job", "LOG_NAME", "log_name"]

#: How long a rank waits for the others (a chunk of the paper's protocol can take an hour).
TIMEOUT = timedelta(hours=24)
#: The log of a single-process run; rank ``r`` of a distributed run writes ``log.rank{r}.jsonl``.
LOG_NAME = "log.jsonl"


@dataclass
class Job:
    """This process's place in the job: ``group`` is the gloo group (None for one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    group: Any = None

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def device(self, configured: str) -> str:
        """The device this rank uses for the configured ``device``."""
        if self.distributed and configured == "cuda":
            count = torch.cuda.device_count()
            if self.local_rank >= count:
                raise ConfigError(
                    "device",
                    f"LOCAL_RANK {self.local_rank} but {count} GPU(s) visible on this node; "
                    "start at most one process per GPU (--nproc_per_node)",
                )
            return f"cuda:{self.local_rank}"
        return configured


def log_name(job: Job) -> str:
    """``log.jsonl`` for one process, ``log.rank{r}.jsonl`` for rank ``r``."""
    return f"log.rank{job.rank}.jsonl" if job.distributed else LOG_NAME


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or sets its variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


_JOB: Optional[Job] = None


def job(device: str) -> Job:
    """This process's :class:`Job`, joining the process group on the first call under
    ``torchrun`` (backend from ``device``); a plain single-process job otherwise."""
    global _JOB
    if _JOB is not None:
        return _JOB
    if not launched():
        _JOB = Job()
        return _JOB
    import torch.distributed as dist

    try:
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as err:
        raise ConfigError("", f"bad torchrun environment: {err}") from None
    gpu = device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise ConfigError("device", f"{device} is not available here; use --set device=cpu")
    backend = "nccl" if gpu else "gloo"
    if gpu:
        torch.cuda.set_device(torch.device(Job(rank, world, local, backend, True).device(device)))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
        atexit.register(_leave)
    group = dist.group.WORLD
    if backend != "gloo":
        group = dist.new_group(backend="gloo", timeout=TIMEOUT)
    if rank != 0:  # one voice: rank 0 reports progress and results
        logging.getLogger("ssni").setLevel(logging.WARNING)
    _JOB = Job(rank, world, local, backend, group)
    return _JOB


#: Seconds a process pauses at exit before leaving the process group (see :func:`_leave`).
EXIT_PAUSE_S = 0.5


def _leave() -> None:
    """Leave the process group at exit. Gloo's worker threads release the tensors of the last
    collectives just after those complete, and releasing one that Python created needs the
    interpreter; if it is already shutting down, the process aborts (SIGABRT, "terminate called
    without an active exception"), which torchrun reports as a failed job. A short pause, during
    which the main thread holds no lock, lets them finish first."""
    import torch.distributed as dist

    if dist.is_initialized():
        time.sleep(EXIT_PAUSE_S)
        dist.destroy_process_group()
