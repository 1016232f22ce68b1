"""Datasets as tensors: images ``(N, C, H, W)`` float32 in [0, 1], labels ``(N,)`` int64.

Loaders read local files only and never download. Splits are deterministic: ``"train"``,
``"val"`` (held out from the training set by a fixed seeded permutation; used for clean
statistics and calibration) and ``"test"``.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from .cifar10 import load_cifar10
from .digits import digits_sha256, load_digits
from .fashion_mnist import (
    DatasetNotFoundError,
    fashion_mnist_sha256,
    load_fashion_mnist,
)
from .imagenet import load_imagenet_val
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
    "load_dataset",
    "dataset_sha256",
]

_NAMES = ("fashion-mnist", "digits")


def load_dataset(
    name: str, split: str = "train", data_dir: Optional[str] = None
) -> Tuple[Tensor, Tensor]:
    """Load ``split`` of dataset ``name`` (``"fashion-mnist"`` or ``"digits"``).

    ``data_dir`` is the directory of the files (ignored for digits, which ship with
    scikit-learn).
    """
    if name == "fashion-mnist":
        return load_fashion_mnist(split, data_dir)
    if name == "digits":
        return load_digits(split)
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(_NAMES)}")


def dataset_sha256(name: str, data_dir: Optional[str] = None) -> str:
    """Provenance hash of the raw files of dataset ``name``."""
    if name == "fashion-mnist":
        return fashion_mnist_sha256(data_dir)
    if name == "digits":
        return digits_sha256()
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(_NAMES)}")
