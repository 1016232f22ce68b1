"""Collectives that let the ranks of a ``torch.distributed`` job share one evaluation.

An evaluation is a list of chunks, fixed runs of ``batch_size`` consecutive samples per seed, whose
randomness is keyed by ``(seed, chunk start, phase)`` only (:mod:`ssni.eval.streams`). Any rank can
therefore compute any chunk and get what a single process gets; the ranks only need to agree on
which chunks are left and who takes which (:func:`share`), and to pool the finished records.

Every function takes ``group``: a process group whose backend can move Python objects on the CPU
(gloo), or ``None`` for a single process (then nothing is communicated).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch import nn

__all__ = ["rank_of", "world_of", "agree", "gather", "broadcast", "share", "share_buffers"]

T = TypeVar("T")


def rank_of(group) -> int:
    """This process's rank in ``group`` (0 without one)."""
    if group is None:
        return 0
    import torch.distributed as dist

    return dist.get_rank(group)


def world_of(group) -> int:
    """Number of ranks in ``group`` (1 without one)."""
    if group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group)


def gather(group, obj: Any) -> List[Any]:
    """``obj`` of every rank, in rank order, on every rank."""
    if group is None:
        return [obj]
    import torch.distributed as dist

    out: List[Any] = [None] * world_of(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast(group, obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if group is None:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, src), group=group)
    return box[0]


def agree(group, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raises on any rank, raise on every rank.

    The rank that failed re-raises its own exception; the others raise ``RuntimeError`` naming
    the first failed rank and its one-line message. So no rank waits forever on one that gave up.
    """
    try:
        value, error = fn(), None
    except Exception as err:  # noqa: BLE001 - passed on to every rank
        value, error = None, err
    if group is None:
        if error is not None:
            raise error
        return value
    message = None if error is None else f"{type(error).__name__}: {str(error).splitlines()[0]}"
    messages = gather(group, message)
    if error is not None:
        raise error
    for rank, msg in enumerate(messages):
        if msg is not None:
            raise RuntimeError(f"rank {rank} failed: {msg}")
    return value


def share(
    chunks: Sequence[Tuple[int, int]], rank: int, world: int
) -> List[Tuple[int, int]]:
    """The chunks of ``rank`` among ``world`` ranks: every ``world``-th of the list, starting at
    ``rank`` (round robin, so ranks get equal shares to within one chunk)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    return list(chunks[rank::world])


def share_buffers(group, module: Optional[nn.Module], src: int = 0) -> None:
    """Copy rank ``src``'s own buffers of ``module`` (not its submodules') to every rank, e.g. the
    clean score-norm statistics of an SSNI policy fitted on rank ``src`` only."""
    if group is None or module is None:
        return
    mine = {k: v.detach().cpu() for k, v in module.named_buffers(recurse=False)}
    theirs = broadcast(group, mine, src)
    with torch.no_grad():
        for name, value in theirs.items():
            getattr(module, name).copy_(value)
