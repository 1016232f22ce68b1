"""Datasets as tensors: images ``(N, C, H, W)`` float32 in [0, 1], labels ``(N,)`` int64.

Loaders read local files only and never download. Splits are deterministic: ``"train"``,
``"val"`` (held out from the training set by a fixed seeded permutation; used for clean
statistics and calibration) and ``"test"``.
"""

from __future__ import annotations

from .cifar10 import load_cifar10
from .digits import digits_sha256, load_digits
from .fashion_mnist import (
    DatasetNotFoundError,
    fashion_mnist_sha256,
    load_fashion_mnist,
)
from .imagenet import load_imagenet_val
from .registry import (
    ALIASES,
    DATASETS,
    DatasetEntry,
    dataset_entry,
    dataset_sha256,
    load_data,
    load_dataset,
    sample_split,
)
from .splits import SPLITS, holdout_split, subset

__all__ = [
    "SPLITS",
    "DatasetNotFoundError",
    "load_fashion_mnist",
    "fashion_mnist_sha256",
    "load_digits",
    "load_cifar10",
    "load_imagenet_val",
    "digits_sha256",
    "holdout_split",
    "subset",
    "DatasetEntry",
    "DATASETS",
    "ALIASES",
    "dataset_entry",
    "load_dataset",
    "sample_split",
    "dataset_sha256",
    "load_data",
]
