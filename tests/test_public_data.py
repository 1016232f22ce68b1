"""CIFAR-10 (python pickle batches) and ImageNet validation (class folders) from local files."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ssni.data.cifar10 import load_cifar10
from ssni.data.fashion_mnist import DatasetNotFoundError
from ssni.data.imagenet import list_image_folder, load_imagenet_val
from ssni.io.adapters import resize_images
from ssni.io.zoo import load_data

Image = pytest.importorskip("PIL.Image", reason="Pillow is needed for the ImageNet loader")


def _write_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    batch = {
        b"batch_label": b"fake batch",
        b"labels": [int(v) for v in labels],
        b"data": images.reshape(len(images), -1),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """A fake CIFAR-10: a full-size test batch (10,000 images) and 5 small training batches."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    test = rng.integers(0, 256, size=(10000, 3, 32, 32), dtype=np.uint8)
    _write_batch(folder / "test_batch", test, np.arange(10000) % 10)
    for b in range(1, 6):
        imgs = rng.integers(0, 256, size=(40, 3, 32, 32), dtype=np.uint8)
        _write_batch(folder / f"data_batch_{b}", imgs, (np.arange(40) + b) % 10)
    return root


def _test_images(root: Path) -> np.ndarray:
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        data = pickle.load(f, encoding="bytes")[b"data"]
    return data.reshape(-1, 3, 32, 32)


def test_cifar10_paper_subset_is_seeded_and_exact(cifar_root: Path) -> None:
    x, y = load_cifar10(cifar_root, "test")  # the paper's 512 images, seed 0
    assert x.shape == (512, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (512,) and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    # The same indices as DiffPure's RandomState(data_seed).choice(10000, 512, replace=False).
    idx = np.random.RandomState(0).choice(10000, 512, replace=False)
    expected = torch.from_numpy(_test_images(cifar_root)[idx].astype(np.float32) / 255.0)
    assert torch.equal(x, expected)
    assert torch.equal(y, torch.from_numpy(idx % 10))
    x2, y2 = load_cifar10(cifar_root, "test", n=512, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = load_cifar10(cifar_root, "test", n=512, seed=1)
    assert not torch.equal(x, x3)


def test_cifar10_whole_split_and_root_forms(cifar_root: Path, tmp_path: Path) -> None:
    x_all, y_all = load_cifar10(cifar_root, "test", n=None)
    assert x_all.shape == (10000, 3, 32, 32)
    assert torch.equal(y_all, torch.arange(10000) % 10)
    x_in, _ = load_cifar10(cifar_root / "cifar-10-batches-py", "test", n=8)
    first8 = torch.from_numpy(np.random.RandomState(0).choice(10000, 8, replace=False))
    assert torch.equal(x_in, x_all[first8])
    x_z, y_z = load_data("cifar10", cifar_root, n=8)
    assert torch.equal(x_z, x_in) and y_z.shape == (8,)

    # The downloaded archive, read in place (a small one: gzip of random bytes is slow).
    small = tmp_path / "src" / "cifar-10-batches-py"
    small.mkdir(parents=True)
    imgs = np.random.default_rng(1).integers(0, 256, size=(30, 3, 32, 32), dtype=np.uint8)
    _write_batch(small / "test_batch", imgs, np.arange(30) % 10)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(small, arcname="cifar-10-batches-py")
    x_tar, _ = load_cifar10(tmp_path, "test", n=None)
    assert torch.equal(x_tar, torch.from_numpy(imgs.astype(np.float32) / 255.0))


def test_cifar10_train_val_holdout(cifar_root: Path) -> None:
    xt, yt = load_cifar10(cifar_root, "train", n=None, n_val=50)
    xv, yv = load_cifar10(cifar_root, "val", n=None, n_val=50)
    assert xt.shape[0] == 150 and xv.shape[0] == 50
    flat = {tuple(v.flatten()[:64].tolist()) for v in torch.cat([xt, xv])}
    assert len(flat) == 200  # disjoint, together the whole training set
    xv2, _ = load_cifar10(cifar_root, "val", n=10, seed=3, n_val=50)
    assert xv2.shape == (10, 3, 32, 32)
    with pytest.raises(ValueError, match="split"):
        load_cifar10(cifar_root, "validation")


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_cifar10_refuses_pickles_with_code_and_reports_missing(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _Payload(str(marker)), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing"):
        load_cifar10(tmp_path, "test", n=None)
    assert not marker.exists()
    with pytest.raises(DatasetNotFoundError, match="cifar-10-python.tar.gz"):
        load_cifar10(tmp_path / "empty", "train")


# --------------------------------------------------------------------------- ImageNet


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    """Three class folders with images of different sizes and formats (plus a stray file)."""
    root = tmp_path_factory.mktemp("imagenet") / "val"
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    sizes = [(300, 260), (260, 400), (512, 256), (256, 256)]
    for c, wnid in enumerate(["n01440764", "n01443537", "n01484850"]):
        folder = root / wnid
        folder.mkdir(parents=True)
        for j, (w, h) in enumerate(sizes):
            img = Image.new("RGB", (w, h), colours[c])
            ext = "JPEG" if j == 0 else "png"
            img.save(folder / f"ILSVRC2012_val_{c}{j}.{ext}")
        (folder / "notes.txt").write_text("not an image")
    # Half red / half blue, 512x256: the centre crop keeps the middle 256 columns.
    split = Image.new("RGB", (512, 256), (255, 0, 0))
    split.paste((0, 0, 255), (256, 0, 512, 256))
    split.save(root / "n01484850" / "ILSVRC2012_val_99.png")
    return root


def test_imagenet_folder_listing(imagenet_root: Path) -> None:
    samples, classes = list_image_folder(imagenet_root)
    assert classes == ["n01440764", "n01443537", "n01484850"]
    assert len(samples) == 13 and [lbl for _, lbl in samples] == [0] * 4 + [1] * 4 + [2] * 5
    names = [p.name for p, _ in samples]
    assert names[:4] == sorted(names[:4]) and all(not n.endswith(".txt") for n in names)


def test_imagenet_subset_deterministic(imagenet_root: Path) -> None:
    x, y = load_imagenet_val(imagenet_root, n=6, seed=0)
    assert x.shape == (6, 3, 256, 256) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    idx = np.random.RandomState(0).choice(13, 6, replace=False)
    samples, _ = list_image_folder(imagenet_root)
    assert y.tolist() == [samples[i][1] for i in idx]
    x2, y2 = load_imagenet_val(imagenet_root, n=6, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    _, y3 = load_imagenet_val(imagenet_root, n=6, seed=5)
    chosen3 = np.random.RandomState(5).choice(13, 6, replace=False)
    assert y3.tolist() == [samples[i][1] for i in chosen3]
    # PNG images are exact solid colours after resizing and cropping.
    for img, lbl, i in zip(x, y, idx):
        if samples[i][0].suffix == ".png" and samples[i][0].stem != "ILSVRC2012_val_99":
            colour = torch.zeros(3)
            colour[lbl] = 1.0
            assert torch.allclose(img, colour.view(3, 1, 1).expand_as(img))


def test_imagenet_resize_paths(imagenet_root: Path) -> None:
    """Classifier at 224 (Resize 256 + CenterCrop 224), diffusion at 256."""
    x224, y224 = load_imagenet_val(imagenet_root, n=None, size=224)
    x256, y256 = load_imagenet_val(imagenet_root, n=None, size=256)
    assert x224.shape == (13, 3, 224, 224) and x256.shape == (13, 3, 256, 256)
    assert torch.equal(y224, y256)
    # The half red / half blue 512x256 image: centre crop of columns 128..384 (256 crop).
    split = x256[-1]
    red = torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 256, 128)
    assert torch.equal(split[:, :, :128], red)
    assert torch.equal(split[:, :, 128:], red.flip(0))
    split224 = x224[-1]  # columns 144..368 of the same image
    assert torch.equal(split224[0, :, :112], torch.ones(224, 112))
    assert torch.equal(split224[2, :, 112:], torch.ones(224, 112))
    up = resize_images(x224, 256)
    assert up.shape == (13, 3, 256, 256)
    assert resize_images(x224, 224) is x224  # no-op at the same size
    solid = x224[:1] * 0 + 0.25
    torch.testing.assert_close(resize_images(solid, 256), torch.full((1, 3, 256, 256), 0.25))
    x_z, _ = load_data("imagenet-val", imagenet_root, n=3)
    assert x_z.shape == (3, 3, 256, 256)


def test_imagenet_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="class"):
        load_imagenet_val(tmp_path / "nope")


def test_resized_purifier_imagenet_path() -> None:
    """224 images -> purifier at 256 -> back to 224, differentiable, inside a Defense."""
    from ssni.core.defense import Defense
    from ssni.core.policies import Constant
    from ssni.core.purifiers import DiffPure
    from ssni.core.score import GaussianScore
    from ssni.io.adapters import Resized, ResizedPurifier

    seen = []

    class Probe(DiffPure):
        def run(self, x, t, generator=None):
            seen.append(tuple(x.shape[-2:]))
            return super().run(x, t, generator=generator)

    purifier = ResizedPurifier(Probe(GaussianScore(), reverse_steps=2), 32)
    classifier = Resized(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 5)),
                         16)
    defense = Defense(classifier, purifier, Constant(0.1))
    x = torch.rand(2, 3, 28, 28, requires_grad=True)
    out = defense.run(x, generator=torch.Generator().manual_seed(0))
    assert seen == [(32, 32)] and out.purified.shape == x.shape and out.logits.shape == (2, 5)
    out.logits.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
