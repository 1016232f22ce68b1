"""Deterministic train / val / test splits and fixed test subsets.

Every dataset loader in this package returns ``(x, y)`` with ``x`` float32 images in [0, 1] of
shape ``(N, C, H, W)`` and ``y`` int64 labels of shape ``(N,)``. Splits are pure functions of the
data and a seed, so the same call always yields the same images.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["SPLITS", "check_split", "holdout_split", "subset", "seeded_permutation"]

SPLITS = ("train", "val", "test")


def check_split(split: str) -> str:
    """Return ``split`` if it is one of ``train``, ``val``, ``test``; else raise ValueError."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def seeded_permutation(n: int, seed: int) -> Tensor:
    """A permutation of ``range(n)`` (int64) that depends only on ``n`` and ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(int(n), generator=gen)


def holdout_split(
    x: Tensor, y: Tensor, split: str, n_val: int, seed: int
) -> Tuple[Tensor, Tensor]:
    """Split a training set into ``train`` and ``val`` by a fixed seeded permutation.

    ``val`` is the first ``n_val`` indices of the permutation (kept in ascending order), ``train``
    the rest; the two are disjoint and together cover ``x``.
    """
    check_split(split)
    if split == "test":
        raise ValueError("holdout_split only makes 'train' and 'val'")
    n = x.shape[0]
    if not 0 < n_val < n:
        raise ValueError(f"n_val must be in (0, {n}), got {n_val}")
    perm = seeded_permutation(n, seed)
    idx = perm[:n_val] if split == "val" else perm[n_val:]
    idx = idx.sort().values
    return x[idx], y[idx]


def subset(x: Tensor, y: Tensor, n: int, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """A fixed random subset of ``n`` samples (without replacement), e.g. the evaluation images.

    The chosen indices depend only on ``len(x)``, ``n`` and ``seed``; they keep the permutation
    order, so ``subset(x, y, m, s)`` is a prefix of ``subset(x, y, n, s)`` for ``m <= n``.
    """
    total = x.shape[0]
    if not 0 < n <= total:
        raise ValueError(f"subset size must be in [1, {total}], got {n}")
    idx = seeded_permutation(total, seed)[:n]
    return x[idx], y[idx]
