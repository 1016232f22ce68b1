"""Data loaders: shapes, ranges, deterministic splits and subsets, the idx parser, clear errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ssni.data import (
    DatasetNotFoundError,
    holdout_split,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    subset,
)
from ssni.data.fashion_mnist import read_idx


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


@pytest.fixture()
def fake_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 30),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 12),
    }
    for i, (name, arr) in enumerate(arrays.items()):
        _write_idx(tmp_path / name, arr, compress=i % 2 == 0)  # mix .gz and plain files
    return tmp_path, arrays


def test_digits_splits_shapes_and_ranges():
    sizes = {}
    for split in ("train", "val", "test"):
        x, y = load_digits(split)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8) and y.shape == (x.shape[0],)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert set(y.tolist()) <= set(range(10))
        sizes[split] = x.shape[0]
    assert sizes == {"train": 1200, "val": 300, "test": 297}
    x1, y1 = load_dataset("digits", "val")
    x2, y2 = load_digits("val")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_holdout_split_is_disjoint_cover_and_deterministic():
    x = torch.arange(100).float().reshape(100, 1, 1, 1)
    y = torch.arange(100)
    xt, yt = holdout_split(x, y, "train", 20, seed=3)
    xv, yv = holdout_split(x, y, "val", 20, seed=3)
    assert len(yv) == 20 and len(yt) == 80
    assert set(yt.tolist()).isdisjoint(yv.tolist())
    assert set(yt.tolist()) | set(yv.tolist()) == set(range(100))
    assert torch.equal(holdout_split(x, y, "val", 20, seed=3)[1], yv)
    assert not torch.equal(holdout_split(x, y, "val", 20, seed=4)[1], yv)
    with pytest.raises(ValueError):
        holdout_split(x, y, "test", 20, seed=3)
    with pytest.raises(ValueError):
        holdout_split(x, y, "nope", 20, seed=3)


def test_subset_is_fixed_and_nested():
    x, y = load_digits("test")
    a = subset(x, y, 50, seed=7)
    b = subset(x, y, 50, seed=7)
    c = subset(x, y, 20, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(c[1], a[1][:20])
    assert not torch.equal(subset(x, y, 50, seed=8)[0], a[0])
    with pytest.raises(ValueError):
        subset(x, y, x.shape[0] + 1)


def test_fashion_mnist_parser_on_fake_files(fake_fmnist):
    directory, arrays = fake_fmnist
    x, y = load_fashion_mnist("test", directory)
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255.0)
    assert torch.allclose(x[:, 0], expected)
    assert y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()

    xt, yt = load_fashion_mnist("train", directory, n_val=10)
    xv, yv = load_fashion_mnist("val", directory, n_val=10)
    assert xt.shape[0] == 20 and xv.shape[0] == 10
    # the two parts are disjoint and together give back the full training set
    joined = torch.cat([xt, xv]).reshape(30, -1)
    full = torch.from_numpy(arrays["train-images-idx3-ubyte"].reshape(30, -1) / 255.0).float()
    assert sorted(map(tuple, joined.tolist())) == sorted(map(tuple, full.tolist()))


def test_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="payload"):
        read_idx(short)


def test_missing_dataset_error_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist("test", tmp_path / "nowhere")
    assert isinstance(info.value, FileNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    with pytest.raises(ValueError):
        load_dataset("no-such-dataset")


def test_real_fashion_mnist_test_split(fashion_mnist):
    x, y = load_fashion_mnist("test", fashion_mnist)
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))
