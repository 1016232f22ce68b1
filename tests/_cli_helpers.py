"""Tiny weight files for command-line tests (seconds to make, no training)."""

import torch

from ssni.io.weights import save_weights
from ssni.nets.cnn import CNN
from ssni.nets.unet import UNet

UNET_KW = dict(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
               attn_levels=(), groups=4, heads=1)
CNN_KW = dict(in_channels=1, num_classes=10, width=4, hidden=16)


def tiny_weights(directory, seed: int = 0):
    """Write a tiny random UNet and CNN as ssni weight files; return their paths."""
    torch.manual_seed(seed)
    unet = UNet(**UNET_KW)
    with torch.no_grad():  # the output layer starts at zero; give it a non-trivial score
        unet.conv_out.weight.normal_(0.0, 0.05)
    cnn = CNN(**CNN_KW).eval()
    score_path = directory / "unet.safetensors"
    clf_path = directory / "cnn.safetensors"
    save_weights(score_path, unet, arch="UNet", arch_kwargs=UNET_KW, kind="score_model",
                 info={"time_scale": 1000.0})
    save_weights(clf_path, cnn, arch="CNN", arch_kwargs=CNN_KW, kind="classifier")
    return score_path, clf_path


def tiny_sets(score_path, clf_path, **extra):
    """``--set`` arguments for a very cheap Fashion-MNIST run with the tiny weights."""
    values = dict(score_model_path=score_path, classifier_path=clf_path, n=16, stats_n=16,
                  levels=2, purify_steps=2, surrogate_steps=1, iterations=1, eot=1,
                  seeds="121,122", batch_size=16, calib_n=16, calib_iterations=1,
                  calib_taus="0.5,1,2", calib_biases="0,0.05", t_grid="0.05,0.1,0.2")
    values.update(extra)
    out = []
    for k, v in values.items():
        out += ["--set", f"{k}={v}"]
    return out


def record_splits(tmp_path, monkeypatch, fmnist_dir):
    """A Fashion-MNIST folder without the test files (reading the test split would fail) and
    ``ssni.data.load_dataset`` patched to record every split asked for.

    Returns ``(train_only_dir, requested_splits, original_load_dataset)``."""
    import ssni.data.registry as data  # the one dataset registry every loader goes through

    train_only = tmp_path / "fmnist-train-only"
    train_only.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (train_only / name).symlink_to(fmnist_dir / name)
    requested = []
    original = data.load_dataset

    def recording(name, split="train", data_dir=None):
        requested.append(split)
        return original(name, split, data_dir)

    monkeypatch.setattr(data, "load_dataset", recording)
    return train_only, requested, original
