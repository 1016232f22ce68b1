"""scikit-learn's 8x8 digits as a tiny image dataset (fast tests)."""

from __future__ import annotations

import hashlib
from typing import Tuple

import numpy as np
import torch
from torch import Tensor

from .splits import check_split, holdout_split, seeded_permutation

__all__ = ["load_digits", "digits_sha256"]

N_TEST = 297
N_VAL = 300
SEED = 0


def _all() -> Tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as _sk_load
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install scikit-learn"
        ) from err
    bunch = _sk_load()
    return bunch.images, bunch.target


def load_digits(split: str = "train", *, seed: int = SEED) -> Tuple[Tensor, Tensor]:
    """Load one split of the 1797 scikit-learn digits.

    The data are permuted once with ``seed``; the last 297 form ``"test"``, then 300 of the
    remaining 1500 form ``"val"`` and 1200 form ``"train"``.

    Returns:
        ``(x, y)``: float32 images ``(N, 1, 8, 8)`` in [0, 1] (pixel value / 16) and int64
        labels ``(N,)``.
    """
    check_split(split)
    images, target = _all()
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(target.astype(np.int64))
    perm = seeded_permutation(x.shape[0], seed)
    test_idx = perm[-N_TEST:].sort().values
    rest_idx = perm[:-N_TEST].sort().values
    if split == "test":
        return x[test_idx], y[test_idx]
    return holdout_split(x[rest_idx], y[rest_idx], split, N_VAL, seed + 1)


def digits_sha256() -> str:
    """SHA-256 of the digits pixel and label arrays, for provenance."""
    images, target = _all()
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(target, dtype=np.int64).tobytes())
    return h.hexdigest()
