"""Registries and loaders: files as their owners distribute them, refusals, clear errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import types
from pathlib import Path
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ssni.core.diffusion import VPSchedule
from ssni.core.score import ScoreModel
from ssni.io.adapters import DiffusersUNet, Normalized, Resized, resize_images
from ssni.io.checkpoints import (
    CheckpointError,
    CheckpointNotFoundError,
    read_checkpoint,
    strip_prefixes,
)
from ssni.io.zoo import (
    CLASSIFIERS,
    DATASETS,
    SCORE_MODELS,
    build_network,
    load_classifier,
    load_score_model,
)

NCSNPP = "ncsnpp_cifar10_ddpmpp_deep_continuous"
GUIDED = "guided_diffusion_256x256_uncond_unet"
WRN = "robustbench_cifar10_linf_standard_wrn28_10"
T = torch.tensor([0.1, 0.6])  # the ncsnpp fixture's times: labels 999 t = 99.9, 599.4
# the guided fixture's labels 100, 600 are the 0-based indices of alpha_bar_101 and alpha_bar_601
T_GUIDED = torch.tensor([0.101, 0.601])


def _json(folder: Path, name: str, kind: str) -> dict:
    with open(folder / f"{name}.{kind}.json", encoding="utf-8") as f:
        return json.load(f)


def _fixture(folder: Path, name: str):
    tensors = load_file(str(folder / f"{name}.small.safetensors"))
    state = {k: v for k, v in tensors.items() if not k.startswith("__")}
    return state, tensors


def _sha(module: nn.Module) -> str:
    lines = [
        f"{k}|{','.join(str(d) for d in v.shape)}|{str(v.dtype).replace('torch.', '')}"
        for k, v in module.state_dict().items()
    ]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _small_entries(folder: Path) -> Dict[str, object]:
    gkw = dict(_json(folder, GUIDED, "small")["unet_model_kwargs"])
    for key in ("use_checkpoint", "use_fp16", "dims"):
        gkw.pop(key)
    gkw = {k: tuple(v) if isinstance(v, list) else v for k, v in gkw.items()}
    return {
        NCSNPP: dataclasses.replace(
            SCORE_MODELS["cifar10-ddpmpp"], config={"nf": 16, "num_res_blocks": 2}
        ),
        GUIDED: dataclasses.replace(SCORE_MODELS["imagenet-guided-256-uncond"], config=gkw),
        WRN: dataclasses.replace(
            CLASSIFIERS["cifar10-wrn-28-10"], config={"depth": 16, "widen_factor": 2}
        ),
    }


# --------------------------------------------------------------------------- registries


@pytest.mark.parametrize(
    "registry,name,fixture",
    [
        ("score", "cifar10-ddpmpp", NCSNPP),
        ("score", "imagenet-guided-256-uncond", GUIDED),
        ("classifier", "cifar10-wrn-28-10", WRN),
    ],
)
def test_registry_builds_the_manifest_layout(
    public_fixtures: Path, registry: str, name: str, fixture: str
) -> None:
    entry = (SCORE_MODELS if registry == "score" else CLASSIFIERS)[name]
    with torch.device("meta"):
        net = build_network(entry.architecture, entry.config)
    assert _sha(net) == _json(public_fixtures, fixture, "manifest")["state_dict_sha256"]


def test_registries_are_data() -> None:
    for registry in (SCORE_MODELS, CLASSIFIERS, DATASETS):
        with pytest.raises(TypeError):
            registry["x"] = None  # type: ignore[index]
        for entry in registry.values():
            assert entry.summary and entry.source
    assert "cifar10-wrn-70-16" in CLASSIFIERS and "imagenet-resnet50" in CLASSIFIERS
    with pytest.raises(KeyError, match="cifar10-ddpmpp"):
        load_score_model("no-such-model", "x.pt")


def test_wrn_70_16_entry_is_diffpure_variant() -> None:
    entry = CLASSIFIERS["cifar10-wrn-70-16"]
    with torch.device("meta"):
        net = build_network(entry.architecture, entry.config)
    assert net.state_dict()["block1.layer.10.conv1.weight"].shape == (256, 256, 3, 3)
    assert net.normalize and entry.config["dropout"] == 0.3 and entry.mean is None


# --------------------------------------------------------------------------- score models


def test_score_sde_checkpoint_uses_ema(public_fixtures: Path, tmp_path: Path) -> None:
    """A DiffPure/score_sde style file: {'model': 'module.'-prefixed weights, 'ema':
    {'shadow_params': list}, 'optimizer', 'step'}; the EMA list holds the reference weights."""
    state, tensors = _fixture(public_fixtures, NCSNPP)
    entry = _small_entries(public_fixtures)[NCSNPP]
    gen = torch.Generator().manual_seed(0)
    raw = {f"module.{k}": v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
           if k != "sigmas" else v for k, v in state.items()}
    order = [k for k, *_ in _json(public_fixtures, NCSNPP, "small")["state_dict"]]
    shadow = [state[k] for k in order if k != "sigmas"]  # model.parameters() order
    ckpt = {
        "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0, 1]}]},
        "model": raw,
        "ema": {"decay": 0.9999, "num_updates": 8, "shadow_params": shadow},
        "step": torch.tensor(8),
    }
    path = tmp_path / "checkpoint_8.pth"
    torch.save(ckpt, path)

    model = load_score_model(entry, path)
    assert isinstance(model, ScoreModel) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    x = tensors["__input__x"]
    with torch.no_grad():
        eps = model.eps(x, T)
    assert (eps - tensors["__output__"]).abs().max() <= 1e-4

    no_ema = load_score_model(entry, path, use_ema=False)
    with torch.no_grad():
        assert (no_ema.eps(x, T) - tensors["__output__"]).abs().max() > 1e-2

    # score = -eps / sigma(t) with the continuous VP schedule.
    sigma = VPSchedule().sigma(T).view(-1, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.score(x, T), -eps / sigma)


def test_score_sde_wrong_ema_list_is_rejected(public_fixtures: Path, tmp_path: Path) -> None:
    state, _ = _fixture(public_fixtures, NCSNPP)
    entry = _small_entries(public_fixtures)[NCSNPP]
    shadow = [v for k, v in state.items() if k != "sigmas"][:-1]  # one tensor short
    path = tmp_path / "checkpoint_8.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()},
                "ema": {"shadow_params": shadow}}, path)
    with pytest.raises(CheckpointError, match="shadow_params.*tensors for .* parameters"):
        load_score_model(entry, path)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_guided_state_dict_learned_sigma_split(
    public_fixtures: Path, tmp_path: Path, fmt: str
) -> None:
    state, tensors = _fixture(public_fixtures, GUIDED)
    entry = _small_entries(public_fixtures)[GUIDED]
    path = tmp_path / f"256x256_diffusion_uncond.{fmt}"
    if fmt == "pt":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    model = load_score_model(entry, path)
    with torch.no_grad():
        eps = model.eps(tensors["__input__x"], T_GUIDED)
    assert eps.shape == (2, 3, 64, 64)  # variance channels dropped
    assert (eps - tensors["__output__"][:, :3]).abs().max() <= 1e-4
    assert model.schedule.discrete


@pytest.mark.parametrize("wrap", ["plain", "state_dict+module", "safetensors"])
def test_wrn_classifier_checkpoint_forms(
    public_fixtures: Path, tmp_path: Path, wrap: str
) -> None:
    state, tensors = _fixture(public_fixtures, WRN)
    entry = _small_entries(public_fixtures)[WRN]
    path = tmp_path / ("Standard.safetensors" if wrap == "safetensors" else "Standard.pt")
    if wrap == "plain":
        torch.save(state, path)
    elif wrap == "state_dict+module":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:
        save_file(state, str(path))
    clf = load_classifier(entry, path)
    with torch.no_grad():
        logits = clf(tensors["__input__x"])
    assert (logits.double() - tensors["__output_f32__"].double()).abs().max() <= 1e-4


# --------------------------------------------------------------------------- refusals and errors


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_carrying_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="carries code"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="carries code"):
        load_classifier("cifar10-wrn-28-10", path)
    assert not marker.exists()


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        load_score_model("cifar10-ddpmpp", tmp_path / "checkpoint_8.pth")
    with pytest.raises(FileNotFoundError):
        load_classifier("cifar10-wrn-28-10", tmp_path / "Standard.pt")
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(1000)}, good)
    data = good.read_bytes()
    for name, blob in [("truncated.pt", data[: len(data) // 2]), ("noise.pt", b"\x80junk" * 64),
                       ("bad.safetensors", b"\x00" * 64)]:
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError, match="cannot read"):
            read_checkpoint(tmp_path / name)


def test_checkpoint_of_another_architecture_lists_keys(
    public_fixtures: Path, tmp_path: Path
) -> None:
    state, _ = _fixture(public_fixtures, NCSNPP)
    path = tmp_path / "checkpoint_8.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_classifier("cifar10-wrn-28-10", path)
    msg = str(info.value)
    assert str(path) in msg and "does not match" in msg
    assert "missing keys: conv1.weight" in msg
    unexpected = msg.split("unexpected keys: ")[1]
    assert "sigmas" in unexpected and "all_modules.0.weight" in unexpected
    assert "more)" in msg  # long lists are cut


def test_smaller_variant_reports_shape_mismatch(public_fixtures: Path, tmp_path: Path) -> None:
    state, _ = _fixture(public_fixtures, WRN)  # WRN-16-2 weights
    path = tmp_path / "Standard.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys: block1\.layer\.2.*shape mismatches"):
        load_classifier("cifar10-wrn-28-10", path)


def test_strip_prefixes() -> None:
    sd = {"module.model.a": 1, "module.b": 2, "c.module.d": 3}
    assert strip_prefixes(sd, ("module.", "model.")) == {"a": 1, "b": 2, "c.module.d": 3}


# --------------------------------------------------------------------------- ImageNet ResNets


def test_torchvision_architectures_need_torchvision(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(ImportError, match=r"ssni\[vision\]"):
        build_network("torchvision:resnet50", {})
    custom = dataclasses.replace(CLASSIFIERS["imagenet-resnet50"], architecture="torchvision:x")
    with pytest.raises(ImportError, match=r"ssni\[vision\]"):
        load_classifier(custom, tmp_path / "resnet50.pth")


def test_imagenet_resnet_folds_normalisation_and_resize(monkeypatch, tmp_path: Path) -> None:
    """Our ResNet with torchvision's key names (no torchvision installed: it is blocked here);
    ImageNet mean/std and the 224 resize live inside. A small width keeps the file small."""
    monkeypatch.setitem(sys.modules, "torchvision", None)
    entry = CLASSIFIERS["imagenet-resnet50"]
    assert entry.architecture == "resnet" and tuple(entry.config["layers"]) == (3, 4, 6, 3)
    small = dataclasses.replace(entry, config={**entry.config, "width": 4})
    torch.manual_seed(0)
    ref = build_network(small.architecture, small.config).eval()
    keys = list(ref.state_dict())
    assert keys[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert "layer1.0.downsample.0.weight" in keys and "layer4.2.conv3.weight" in keys
    assert keys[-2:] == ["fc.weight", "fc.bias"]
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(ref.state_dict(), path)
    clf = load_classifier(small, path)
    assert isinstance(clf, Resized) and isinstance(clf.module, Normalized)
    x = torch.rand(2, 3, 256, 256)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), ref((resize_images(x, 224) - mean) / std))
        # evaluate() offers every model a generator; a deterministic classifier ignores it
        torch.testing.assert_close(clf(x, generator=torch.Generator()), clf(x))


@pytest.mark.parametrize("arch", ["resnet50", "resnet18", "wide_resnet50_2"])
def test_imagenet_resnet_equals_torchvision(arch: str) -> None:
    tvm = pytest.importorskip("torchvision.models", reason="torchvision is not installed")
    torch.manual_seed(0)
    ref = getattr(tvm, arch)(weights=None).eval()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    entry = CLASSIFIERS[f"imagenet-{arch.replace('_', '-')}"]
    ours = build_network(entry.architecture, entry.config).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours.double()(x), ref.double()(x), rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- diffusers


def test_diffusers_folder_is_a_score_model(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    ).eval()
    folder = tmp_path / "ddpm-tiny"
    unet.save_pretrained(str(folder / "unet"))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
        "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon",
    }))
    model = load_score_model("diffusers", folder)
    assert isinstance(model, DiffusersUNet) and not model.training
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([0.1, 0.6])
    with torch.no_grad():
        ours = model.eps(x, t)
        direct = unet(x, torch.tensor([99, 599])).sample  # label k - 1 for alpha_bar_k
    torch.testing.assert_close(ours, direct, rtol=0, atol=1e-6)
    assert model.schedule.discrete and model.schedule.num_steps == 1000
    # The schedule is DDPM's: alpha_bar after k steps of linspace(1e-4, 0.02, 1000).
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(
        model.schedule.alpha_bar(torch.tensor([0.1], dtype=torch.float64)), abar[99:100]
    )

    bare = tmp_path / "bare-unet"
    unet.save_pretrained(str(bare))
    with torch.no_grad():
        torch.testing.assert_close(load_score_model("diffusers", bare).eps(x, t), ours)


def test_diffusers_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        load_score_model("diffusers", tmp_path / "nothing-here")


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_diffusers_prediction_types_give_eps(kind: str) -> None:
    """A stand-in network that predicts the exact target: the adapter must return the noise."""
    schedule = VPSchedule(discrete=True)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 4, 4, generator=gen) * 2 - 1
    t = torch.tensor([0.2, 0.7])
    xt, eps = schedule.perturb(x0, t, generator=gen)
    a = schedule.alpha_bar(t).view(-1, 1, 1, 1)
    target = {"epsilon": eps, "sample": x0,
              "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[kind]

    class Oracle(nn.Module):
        def forward(self, x, timesteps):
            assert torch.equal(timesteps, torch.tensor([199.0, 699.0]))
            return types.SimpleNamespace(sample=target)

    model = DiffusersUNet(Oracle(), schedule, prediction_type=kind)
    torch.testing.assert_close(model.eps(xt, t), eps, rtol=1e-5, atol=1e-5)
