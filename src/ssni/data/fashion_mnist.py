"""Fashion-MNIST from the standard idx files (``.gz`` or uncompressed).

The Debian package ``dataset-fashion-mnist`` installs them under
``/usr/share/datasets/fashion-mnist``; any directory holding the four files works.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .splits import check_split, holdout_split

__all__ = [
    "DEFAULT_DIR",
    "FILES",
    "CLASSES",
    "DatasetNotFoundError",
    "load_fashion_mnist",
    "read_idx",
    "fashion_mnist_sha256",
]

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "SSNI_FASHION_MNIST_DIR"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
N_VAL = 5000
VAL_SEED = 20240601

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

PathLike = Union[str, "os.PathLike[str]"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset file is missing; the message says how to get it."""


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        path = directory / name
        if path.is_file():
            return path
    raise DatasetNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}. Install it with "
        f"`apt-get install dataset-fashion-mnist` (files go to {DEFAULT_DIR}) or pass a "
        f"directory holding the four idx files (train-/t10k- images-idx3-ubyte and "
        f"labels-idx1-ubyte, .gz or plain)."
    )


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def read_idx(path: PathLike) -> np.ndarray:
    """Parse one idx file (``.gz`` or plain) into a numpy array of its stored shape and type."""
    data = _read_bytes(Path(path))
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise ValueError(f"{path}: unknown idx data type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_DTYPES[code])
    count = int(np.prod(shape)) if ndim else 1
    if len(data) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path}: idx payload has {len(data) - header} bytes, header says "
            f"{count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def resolve_dir(data_dir: Optional[PathLike] = None) -> Path:
    """``data_dir``, else ``$SSNI_FASHION_MNIST_DIR``, else the Debian location."""
    if data_dir is None:
        data_dir = os.environ.get(ENV_VAR) or DEFAULT_DIR
    return Path(data_dir).expanduser()


def _load_part(directory: Path, part: str) -> Tuple[Tensor, Tensor]:
    img_stem, lbl_stem = FILES[part]
    images = read_idx(_find(directory, img_stem))
    labels = read_idx(_find(directory, lbl_stem))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{directory}: {part} images {images.shape} and labels {labels.shape} do not match"
        )
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def load_fashion_mnist(
    split: str = "train",
    data_dir: Optional[PathLike] = None,
    *,
    n_val: int = N_VAL,
    val_seed: int = VAL_SEED,
) -> Tuple[Tensor, Tensor]:
    """Load one split of Fashion-MNIST.

    Args:
        split: ``"train"`` (60000 - n_val images), ``"val"`` (n_val images held out from the
            official training set by a fixed seeded permutation) or ``"test"`` (10000 images).
        data_dir: directory with the idx files; default ``$SSNI_FASHION_MNIST_DIR`` or
            ``/usr/share/datasets/fashion-mnist``.
        n_val, val_seed: size and seed of the held-out validation split.

    Returns:
        ``(x, y)``: float32 images ``(N, 1, 28, 28)`` in [0, 1] and int64 labels ``(N,)``.

    Raises:
        DatasetNotFoundError: a file is missing (message says how to install it).
    """
    check_split(split)
    directory = resolve_dir(data_dir)
    if split == "test":
        return _load_part(directory, "test")
    x, y = _load_part(directory, "train")
    return holdout_split(x, y, split, n_val, val_seed)


def fashion_mnist_sha256(data_dir: Optional[PathLike] = None) -> str:
    """SHA-256 of the four files' decompressed contents (fixed order), for provenance."""
    directory = resolve_dir(data_dir)
    h = hashlib.sha256()
    for part in ("train", "test"):
        for stem in FILES[part]:
            path = _find(directory, stem)
            h.update(_read_bytes(path))
    return h.hexdigest()
