"""The one registry of datasets: name -> :class:`DatasetEntry` (local files only, no download).

Every consumer (the CLI's image loading, training, :func:`ssni.io.zoo.load_data`) goes through
:func:`sample_split` (a fixed seeded subset of one split), :func:`load_dataset` (a whole split)
or :func:`load_data` (the entry's own loader with its paper defaults).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from torch import Tensor

from .cifar10 import load_cifar10
from .digits import digits_sha256, load_digits
from .fashion_mnist import fashion_mnist_sha256, load_fashion_mnist
from .imagenet import load_imagenet_val, sample_imagenet
from .splits import subset

__all__ = [
    "DatasetEntry",
    "DATASETS",
    "ALIASES",
    "dataset_entry",
    "load_dataset",
    "sample_split",
    "dataset_sha256",
    "load_data",
]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset read from local files.

    ``split(split, root)`` loads a whole split (``None`` when the dataset has no such loader);
    ``sample(root, split, n, seed)`` a fixed seeded subset of ``n`` images of a split (default:
    the whole split, then :func:`~ssni.data.splits.subset`); ``loader(root, **defaults)`` is the
    paper's evaluation loader (default: ``sample`` with ``defaults``); ``sha256(root)`` a
    provenance hash. ``needs_root``: the files have no default location.
    """

    summary: str
    source: str
    split: Optional[Callable[..., Tuple[Tensor, Tensor]]] = None
    sample: Optional[Callable[..., Tuple[Tensor, Tensor]]] = None
    loader: Optional[Callable[..., Tuple[Tensor, Tensor]]] = None
    sha256: Optional[Callable[[Optional[PathLike]], str]] = None
    needs_root: bool = True
    defaults: Mapping[str, Any] = field(default_factory=dict)


DATASETS: Mapping[str, DatasetEntry] = MappingProxyType(
    {
        "fashion-mnist": DatasetEntry(
            summary="Fashion-MNIST 28x28 grey (the data of the shipped models)",
            source="Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) or "
            "the idx .gz files of github.com/zalandoresearch/fashion-mnist",
            split=load_fashion_mnist,
            sha256=fashion_mnist_sha256,
            needs_root=False,
            defaults=MappingProxyType({"split": "test", "n": 512, "seed": 0}),
        ),
        "digits": DatasetEntry(
            summary="scikit-learn's 1797 8x8 digits (tiny, for quick checks)",
            source="scikit-learn (sklearn.datasets.load_digits)",
            split=lambda split, root=None: load_digits(split),
            sha256=lambda root=None: digits_sha256(),
            needs_root=False,
            defaults=MappingProxyType({"split": "test", "n": 297, "seed": 0}),
        ),
        "cifar10": DatasetEntry(
            summary="CIFAR-10, python pickle batches; the paper evaluates 512 seeded test images",
            source="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (folder "
            "cifar-10-batches-py, or the archive itself)",
            split=lambda split, root: load_cifar10(root, split, n=None),
            sample=load_cifar10,
            loader=load_cifar10,
            defaults=MappingProxyType({"split": "test", "n": 512, "seed": 0}),
        ),
        "imagenet": DatasetEntry(
            summary="ImageNet validation set as one folder per class (wnid); the paper "
            "evaluates 128 seeded images",
            source="ILSVRC2012 validation images arranged in class subfolders",
            sample=sample_imagenet,
            loader=load_imagenet_val,
            defaults=MappingProxyType({"n": 128, "seed": 0, "size": 256}),
        ),
    }
)

#: Other names accepted for an entry.
ALIASES: Mapping[str, str] = MappingProxyType({"imagenet-val": "imagenet"})


def dataset_entry(name: str) -> DatasetEntry:
    """The entry of ``name`` (or of its alias); ``KeyError`` naming the known datasets."""
    entry = DATASETS.get(ALIASES.get(name, name))
    if entry is None:
        known = ", ".join(sorted([*DATASETS, *ALIASES]))
        raise KeyError(f"unknown dataset {name!r}; known: {known}")
    return entry


def _entry(name: str) -> DatasetEntry:
    try:
        return dataset_entry(name)
    except KeyError as err:
        raise ValueError(err.args[0]) from None


def load_dataset(
    name: str, split: str = "train", data_dir: Optional[PathLike] = None
) -> Tuple[Tensor, Tensor]:
    """The whole ``split`` of dataset ``name``: images ``(N, C, H, W)`` float32 in [0, 1],
    labels ``(N,)`` int64. ``data_dir``: the folder of the files (digits need none)."""
    entry = _entry(name)
    if entry.split is None:
        raise ValueError(f"dataset {name!r} has no whole-split loader; use sample_split")
    return entry.split(split, data_dir)


def sample_split(
    name: str, split: str, n: int, seed: int, data_dir: Optional[PathLike] = None
) -> Tuple[Tensor, Tensor]:
    """A fixed seeded subset of ``n`` images of ``split`` (``train``/``val``/``test``);
    ``ValueError`` when the split has fewer images or the dataset needs ``data_dir``."""
    entry = _entry(name)
    if entry.needs_root and not data_dir:
        raise ValueError(f"dataset {name!r} needs the folder of its files ({entry.source})")
    if entry.sample is not None:
        return entry.sample(data_dir, split, int(n), int(seed))
    x, y = load_dataset(name, split, data_dir or None)
    if n > x.shape[0]:
        raise ValueError(f"{name} {split} has only {x.shape[0]} images, asked {n}")
    return subset(x, y, int(n), int(seed))


def dataset_sha256(name: str, data_dir: Optional[PathLike] = None) -> str:
    """Provenance hash of the raw files of dataset ``name``."""
    entry = _entry(name)
    if entry.sha256 is None:
        raise ValueError(f"dataset {name!r} has no provenance hash")
    return entry.sha256(data_dir)


def load_data(name: str, root: Optional[PathLike], **kwargs: Any) -> Tuple[Tensor, Tensor]:
    """Load dataset ``name`` from ``root`` as the paper evaluates it: the entry's defaults
    (e.g. CIFAR-10: 512 seeded test images) overridden by ``kwargs``; ``(x, y)``."""
    entry = dataset_entry(name)
    options: Dict[str, Any] = dict(entry.defaults)
    options.update(kwargs)
    if entry.loader is not None:
        return entry.loader(root, **options)
    return sample_split(name, options["split"], options["n"], options["seed"], root)
