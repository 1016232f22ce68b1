"""Own networks and training: shapes, checkpoints with metadata, exact resume, CLI commands."""

from __future__ import annotations

import pytest
import torch

from ssni.cli.main import main
from ssni.core.score import EpsilonNetwork
from ssni.data import load_digits
from ssni.io.weights import load_classifier_file, load_score_model_file, read_metadata, save_weights
from ssni.nets.cnn import CNN
from ssni.nets.unet import UNet
from ssni.train import (
    checkpoint_path_for,
    evaluate_classifier,
    train_classifier,
    train_score_model,
)

TINY_UNET = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_levels=(1,),
                 groups=4)


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def digits():
    return load_digits("train")


def test_unet_shapes_any_size():
    torch.manual_seed(0)
    for shape, kwargs in [((2, 1, 8, 8), TINY_UNET),
                          ((2, 1, 28, 28), dict(base_channels=8, groups=4)),
                          ((2, 3, 9, 7), dict(TINY_UNET, in_channels=3))]:
        net = UNet(**kwargs)
        x = torch.randn(*shape)
        assert net(x, torch.rand(shape[0]) * 1000).shape == shape
    assert net(x, torch.tensor(500.0)).shape == x.shape


def test_default_unet_size():
    n = sum(p.numel() for p in UNet().parameters())
    assert 0.8e6 < n < 1.5e6


def test_cnn_shapes():
    assert CNN()(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert CNN(width=8, hidden=16, pool=2)(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_score_training_saves_loadable_weights(tmp_path, digits):
    x, _ = digits
    torch.manual_seed(0)
    net = UNet(**TINY_UNET)
    seen = []
    result = train_score_model(net, x, steps=4, batch_size=16, seed=1, warmup=2,
                               callback=seen.append)
    assert [s["step"] for s in seen] == [1, 2, 3, 4] and len(result.losses) == 4
    assert all(torch.isfinite(torch.tensor(result.losses)))
    out = tmp_path / "unet.safetensors"
    save_weights(out, result.model, arch="UNet", arch_kwargs=TINY_UNET, kind="score_model",
                 info={"schedule": {"beta_min": 0.1, "beta_max": 20.0}, "time_scale": 1000.0,
                       "steps": 4, "command": "test"})
    meta = read_metadata(out)
    assert meta["arch"] == "UNet" and meta["steps"] == 4 and meta["command"] == "test"
    model = load_score_model_file(out)
    assert isinstance(model, EpsilonNetwork) and not model.training
    assert model.time_scale == 1000.0
    xb = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0.05, 0.1, 0.3])
    expected = result.model(xb, t * 1000)
    assert torch.allclose(model.eps(xb, t), expected, atol=1e-6)
    with pytest.raises(ValueError):
        load_classifier_file(out)


def test_resume_continues_from_saved_step(tmp_path, digits):
    x, _ = digits
    kwargs = dict(steps=6, batch_size=8, seed=3, warmup=2, checkpoint_every=2)

    torch.manual_seed(0)
    full = train_score_model(UNet(**TINY_UNET), x, **kwargs)

    ckpt = tmp_path / "run.ckpt.safetensors"

    def stop_after_4(info):
        if info["step"] == 4:
            raise _Stop

    torch.manual_seed(0)
    with pytest.raises(_Stop):
        train_score_model(UNet(**TINY_UNET), x, checkpoint_path=ckpt, callback=stop_after_4,
                          **kwargs)
    assert ckpt.exists()
    torch.manual_seed(123)  # different init: everything must come from the checkpoint
    steps_seen = []
    resumed = train_score_model(UNet(**TINY_UNET), x, checkpoint_path=ckpt,
                                callback=lambda i: steps_seen.append(i["step"]), **kwargs)
    assert steps_seen == [5, 6]
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="different configuration"):
        train_score_model(UNet(**TINY_UNET), x, checkpoint_path=ckpt,
                          **dict(kwargs, batch_size=4))
    # a finished run can be extended: only the remaining steps are trained
    steps_seen.clear()
    train_score_model(UNet(**TINY_UNET), x, checkpoint_path=ckpt,
                      callback=lambda i: steps_seen.append(i["step"]), **dict(kwargs, steps=7))
    assert steps_seen == [7]
    with pytest.raises(ValueError, match="beyond"):
        train_score_model(UNet(**TINY_UNET), x, checkpoint_path=ckpt, **dict(kwargs, steps=5))


def test_classifier_training_and_loading(tmp_path, digits):
    x, y = digits
    torch.manual_seed(0)
    kwargs = dict(width=8, hidden=32, pool=2)
    result = train_classifier(CNN(**kwargs), x, y, epochs=3, batch_size=64, lr=5e-3, warmup=5)
    xt, yt = load_digits("test")
    acc = evaluate_classifier(result.model, xt, yt)
    assert acc > 0.3  # well above chance (0.1) after a few dozen steps
    out = tmp_path / "cnn.safetensors"
    save_weights(out, result.model, arch="CNN", arch_kwargs=kwargs, kind="classifier")
    loaded = load_classifier_file(out)
    assert not loaded.training
    assert evaluate_classifier(loaded, xt, yt) == acc


def test_cli_train_commands(tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    argv = ["--quiet", "train-score", "--data", "digits", "--steps", "3", "--batch-size", "8",
            "--base-channels", "8", "--out", str(out)]
    assert main(argv) == 0
    assert out.exists() and not checkpoint_path_for(out).exists()
    meta = read_metadata(out)
    assert meta["kind"] == "score_model" and meta["steps"] == 3
    assert meta["command"].startswith("ssni train-score --data digits --steps 3")
    assert meta["data"]["name"] == "digits" and len(meta["data"]["sha256"]) == 64
    assert load_score_model_file(out)(torch.randn(2, 1, 8, 8), torch.rand(2)).shape == (2, 1, 8, 8)

    cnn = tmp_path / "c.safetensors"
    argv = ["train-classifier", "--quiet", "--data", "digits", "--epochs", "1", "--batch-size",
            "64", "--width", "8", "--out", str(cnn), "--keep-checkpoint"]
    assert main(argv) == 0
    assert checkpoint_path_for(cnn).exists()
    assert "test accuracy" in capsys.readouterr().out
    assert 0.0 <= read_metadata(cnn)["test_accuracy"] <= 1.0
    # rerunning resumes from the kept checkpoint (already complete: no new steps)
    assert main(argv) == 0
    assert main(["eval-classifier", "--data", "digits", str(cnn)]) == 0
    assert "accuracy" in capsys.readouterr().out
    argv = ["eval-score", str(out), "--classifier", str(cnn), "--data", "digits", "--n", "40",
            "--t", "0.1"]
    assert main(argv) == 0
    assert "one-step denoised" in capsys.readouterr().out


def test_cli_missing_dataset_is_a_usage_error(tmp_path, capsys):
    argv = ["--quiet", "train-classifier", "--data-dir", str(tmp_path), "--out",
            str(tmp_path / "c.safetensors")]
    assert main(argv) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
