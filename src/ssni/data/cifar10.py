"""CIFAR-10 from the standard "python version" pickle batches (Krizhevsky 2009).

``root`` may be the ``cifar-10-batches-py`` folder, its parent, or a folder holding the
``cifar-10-python.tar.gz`` archive (read in place). The batches are pickles; they are read with an
unpickler that only accepts plain containers and numpy arrays, so a file carrying code is refused.

Splits: ``"test"`` is ``test_batch`` (10,000 images); ``"val"`` is a fixed seeded 5,000-image
hold-out of the training batches (clean reference statistics, calibration); ``"train"`` is the
other 45,000. The paper's evaluation set is ``load_cifar10(root, "test", n=512, seed=0)``: the
same seeded choice as DiffPure's ``data_seed`` (``numpy.random.RandomState(seed).choice``).
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .fashion_mnist import DatasetNotFoundError
from .splits import check_split, holdout_split

__all__ = ["load_cifar10", "seeded_choice", "CIFAR10_CLASSES", "read_cifar_batch"]

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
N_VAL = 5000
VAL_SEED = 20240601

PathLike = Union[str, "os.PathLike[str]"]

# (module, name) pairs a CIFAR batch pickle may reference: numpy array reconstruction only.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - pickle hook
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load a pickle that references {module}.{name} (only numpy arrays "
                "and plain containers are allowed in a CIFAR-10 batch)"
            )
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


def read_cifar_batch(data: bytes, source: str = "batch") -> Tuple[np.ndarray, np.ndarray]:
    """Parse one pickled batch: returns uint8 images ``(N, 3, 32, 32)`` and int64 labels."""
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise ValueError(f"{source}: {err}") from err
    except (EOFError, ValueError, TypeError, IndexError, KeyError) as err:
        raise ValueError(f"{source}: not a CIFAR-10 batch pickle ({err})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: not a CIFAR-10 batch (a {type(obj).__name__})")
    obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in obj or "labels" not in obj:
        raise ValueError(f"{source}: not a CIFAR-10 batch (keys {sorted(obj)})")
    images = np.asarray(obj["data"], dtype=np.uint8)
    labels = np.asarray(obj["labels"], dtype=np.int64)
    if images.ndim != 2 or images.shape[1] != 3072 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{source}: unexpected shapes {images.shape} / {labels.shape}")
    return images.reshape(-1, 3, 32, 32), labels


def _read_batches(root: Path, names: Tuple[str, ...]) -> List[Tuple[np.ndarray, np.ndarray]]:
    for folder in (root, root / FOLDER):
        if all((folder / n).is_file() for n in names):
            return [read_cifar_batch((folder / n).read_bytes(), str(folder / n)) for n in names]
    for archive in (root / ARCHIVE, root):
        if archive.is_file() and tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tar:
                members: Dict[str, tarfile.TarInfo] = {
                    Path(m.name).name: m for m in tar.getmembers() if m.isfile()
                }
                if all(n in members for n in names):
                    out = []
                    for n in names:
                        f = tar.extractfile(members[n])
                        assert f is not None
                        out.append(read_cifar_batch(f.read(), f"{archive}:{n}"))
                    return out
    raise DatasetNotFoundError(
        f"CIFAR-10 batches {', '.join(names)} not found under {root}: download "
        f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and pass the folder holding "
        f"{ARCHIVE} or the extracted {FOLDER}/"
    )


def seeded_choice(total: int, n: int, seed: int) -> np.ndarray:
    """``n`` distinct indices of ``range(total)``, as DiffPure draws its evaluation subsets:
    ``numpy.random.RandomState(seed).choice(total, n, replace=False)`` (order kept)."""
    if not 0 < n <= total:
        raise ValueError(f"subset size must be in [1, {total}], got {n}")
    return np.random.RandomState(seed).choice(total, n, replace=False)


def load_cifar10(
    root: PathLike,
    split: str = "test",
    n: Optional[int] = 512,
    seed: int = 0,
    *,
    n_val: int = N_VAL,
    val_seed: int = VAL_SEED,
) -> Tuple[Tensor, Tensor]:
    """Load CIFAR-10 ``split`` from local files, optionally a seeded subset of ``n`` images.

    Args:
        root: folder with ``cifar-10-batches-py/`` (or the batches, or the ``.tar.gz``).
        split: ``"test"``, ``"val"`` or ``"train"`` (see the module docstring).
        n: subset size (the paper: 512 test images); ``None`` for the whole split.
        seed: subset seed (DiffPure's ``data_seed``).
        n_val, val_seed: size and seed of the validation hold-out.

    Returns:
        ``x`` float32 ``(n, 3, 32, 32)`` in [0, 1] and ``y`` int64 ``(n,)``.
    """
    check_split(split)
    root = Path(root)
    batches = _read_batches(root, TEST_BATCHES if split == "test" else TRAIN_BATCHES)
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    index = torch.arange(images.shape[0])
    if split != "test":
        index, _ = holdout_split(index, index, split, n_val, val_seed)
    if n is not None:
        index = index[torch.from_numpy(seeded_choice(index.shape[0], int(n), seed))]
    idx = index.numpy()
    x = torch.from_numpy(images[idx].astype(np.float32) / 255.0)
    y = torch.from_numpy(labels[idx])
    return x, y
