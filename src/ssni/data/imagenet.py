"""ImageNet validation images from a folder of class subfolders, without torchvision.

Layout: ``root/<class>/<image>`` (the usual ``val/n01440764/ILSVRC2012_val_00000293.JPEG``).
Classes are the sorted subfolder names (label = position, which is the standard ImageNet class
index when all 1000 wnid folders are present); images are listed as torchvision's
``ImageFolder`` lists them (sorted, recursive, by extension), so a seeded subset picks the same
files as DiffPure's ``numpy.random.RandomState(seed).choice(len(dataset), n, replace=False)``.

Preprocessing (PIL): RGB, shorter side resized to ``resize`` (bilinear), centre crop ``size``,
scaled to [0, 1]. ``size=256`` (default) gives the guided-diffusion resolution directly;
``size=224`` is the classifier resolution (DiffPure: Resize(256) + CenterCrop(224), then bilinear
224 -> 256 around the diffusion model with :func:`ssni.io.adapters.resize_images`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .cifar10 import seeded_choice
from .fashion_mnist import DatasetNotFoundError

__all__ = [
    "load_imagenet_val",
    "sample_imagenet",
    "list_image_folder",
    "load_image",
    "IMG_EXTENSIONS",
]

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PathLike = Union[str, "os.PathLike[str]"]


def list_image_folder(
    root: PathLike, classes: Optional[Sequence[str]] = None
) -> Tuple[List[Tuple[Path, int]], List[str]]:
    """``([(path, label)], classes)`` for a folder of class subfolders, in a fixed order."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"ImageNet folder not found: {root} (expected one subfolder per class, e.g. "
            "val/n01440764/*.JPEG)"
        )
    if classes is None:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise DatasetNotFoundError(f"no class subfolders in {root}")
    samples: List[Tuple[Path, int]] = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            raise DatasetNotFoundError(f"class folder missing: {folder}")
        for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
            for fname in sorted(files):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    samples.append((Path(dirpath) / fname, label))
    if not samples:
        raise DatasetNotFoundError(f"no images under {root} (extensions {IMG_EXTENSIONS})")
    return samples, list(classes)


def load_image(path: PathLike, size: int = 256, resize: Optional[int] = None) -> Tensor:
    """One image as float32 ``(3, size, size)`` in [0, 1]: shorter side to ``resize`` (default
    ``max(size, 256)``) with bilinear filtering, then a centre crop of ``size``."""
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(
            "reading ImageNet images needs Pillow: pip install 'ssni[imagenet]'"
        ) from err

    resize = max(size, 256) if resize is None else int(resize)
    if resize < size:
        raise ValueError(f"resize ({resize}) must be >= size ({size})")
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        if w <= h:
            new_w, new_h = resize, int(resize * h / w)
        else:
            new_w, new_h = int(resize * w / h), resize
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.BILINEAR)
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
        arr = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def load_imagenet_val(
    root: PathLike,
    n: Optional[int] = 128,
    seed: int = 0,
    size: int = 256,
    *,
    resize: Optional[int] = None,
    classes: Optional[Sequence[str]] = None,
) -> Tuple[Tensor, Tensor]:
    """Load a seeded subset of ImageNet validation images (the paper: 128 images).

    Args:
        root: the validation folder with one subfolder per class.
        n: number of images (``None``: all, in folder order).
        seed: subset seed (DiffPure's ``data_seed``).
        size: output height = width (256 for the diffusion model, 224 for classifiers).
        resize: shorter side before the centre crop (default ``max(size, 256)``).
        classes: explicit class-folder order (default: sorted subfolder names).

    Returns:
        ``x`` float32 ``(n, 3, size, size)`` in [0, 1], ``y`` int64 ``(n,)``.
    """
    samples, names = list_image_folder(root, classes)
    if len(names) != 1000:
        log.warning(
            "%s has %d class folders, not 1000: labels are positions among them and may not "
            "match an ImageNet classifier's outputs", root, len(names)
        )
    if n is None:
        chosen = np.arange(len(samples))
    else:
        chosen = seeded_choice(len(samples), int(n), seed)
    images = [load_image(samples[i][0], size, resize) for i in chosen]
    labels = [samples[i][1] for i in chosen]
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def sample_imagenet(
    root: PathLike, split: str, n: int, seed: int, size: int = 256
) -> Tuple[Tensor, Tensor]:
    """ImageNet has only the validation folder: ``"test"`` is the paper's seeded subset (the
    first half of a seeded permutation, as :func:`load_imagenet_val`); ``"train"``/``"val"``
    (held-out images for statistics and calibration) come from the second half."""
    if split == "test":
        return load_imagenet_val(root, n=n, seed=seed, size=size)
    samples, _ = list_image_folder(root)
    perm = np.random.RandomState(seed).permutation(len(samples))
    pool = perm[len(samples) // 2 :]
    if n > pool.size:
        raise ValueError(f"only {pool.size} held-out ImageNet images available, asked {n}")
    chosen = pool[:n]
    x = torch.stack([load_image(samples[i][0], size) for i in chosen])
    y = torch.tensor([samples[i][1] for i in chosen], dtype=torch.int64)
    return x, y
