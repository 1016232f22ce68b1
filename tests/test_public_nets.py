"""Our re-implementations of the public architectures against the reference fixtures.

Small random-weight copies must load with strict=True and reproduce the saved reference outputs
(float64 within 1e-9, float32 within 1e-4); full-size builds (meta device) must have exactly the
manifest's state_dict layout.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ssni.nets import GuidedUNet, NCSNpp, WideResNet, wrn_28_10, wrn_70_16

NCSNPP = "ncsnpp_cifar10_ddpmpp_deep_continuous"
GUIDED = "guided_diffusion_256x256_uncond_unet"
WRN = "robustbench_cifar10_linf_standard_wrn28_10"


def _wrn_from_config(cfg: dict) -> WideResNet:
    kwargs = {("dropout" if k == "dropRate" else k): v for k, v in cfg.items()}
    return WideResNet(**kwargs)


SMALL_BUILDERS: Dict[str, Callable[[dict], nn.Module]] = {
    NCSNPP: lambda js: NCSNpp.from_score_sde_config(js["constructor_config"]),
    GUIDED: lambda js: GuidedUNet.from_config(js["unet_model_kwargs"]),
    WRN: lambda js: _wrn_from_config(js["constructor_config"]),
}

FULL_BUILDERS: Dict[str, List[Tuple[str, Callable[[dict], nn.Module]]]] = {
    NCSNPP: [
        ("defaults", lambda js: NCSNpp()),
        ("score_sde config", lambda js: NCSNpp.from_score_sde_config(
            {"model": js["constructor_config"], "data": {"image_size": 32, "num_channels": 3,
                                                         "centered": True}})),
    ],
    GUIDED: [
        ("defaults", lambda js: GuidedUNet()),
        ("UNetModel kwargs", lambda js: GuidedUNet.from_config(js["unet_model_kwargs"])),
        ("script flags", lambda js: GuidedUNet.from_flags(js["create_model_and_diffusion_flags"])),
    ],
    WRN: [
        ("wrn_28_10()", lambda js: wrn_28_10()),
        ("constructor config", lambda js: _wrn_from_config(js["constructor_config"])),
    ],
}


def layout(module: nn.Module) -> List[Tuple[str, List[int], str]]:
    return [
        (k, list(v.shape), str(v.dtype).replace("torch.", ""))
        for k, v in module.state_dict().items()
    ]


def layout_sha256(entries) -> str:
    text = "\n".join(f"{k}|{','.join(str(d) for d in shape)}|{dt}" for k, shape, dt in entries)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _json(folder: Path, name: str, kind: str) -> dict:
    with open(folder / f"{name}.{kind}.json", encoding="utf-8") as f:
        return json.load(f)


def _run(model: nn.Module, tensors: Dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    model = model.to(dtype).eval()
    x = tensors["__input__x"].to(dtype)
    with torch.no_grad():
        if "__input__t" in tensors:
            t = tensors["__input__t"]
            return model(x, t.to(dtype) if t.is_floating_point() else t)
        return model(x)


@pytest.mark.parametrize("name", [NCSNPP, GUIDED, WRN])
def test_small_fixture_reproduces_reference(public_fixtures: Path, name: str) -> None:
    meta = _json(public_fixtures, name, "small")
    tensors = load_file(str(public_fixtures / f"{name}.small.safetensors"))
    state = {k: v for k, v in tensors.items() if not k.startswith("__")}
    model = SMALL_BUILDERS[name](meta)

    # Same ordered layout as the reference (and its one-line hash).
    expected = [tuple(e[:3]) for e in meta["state_dict"]]
    assert [tuple(e) for e in layout(model)] == [(k, list(s), d) for k, s, d in expected]
    assert layout_sha256(layout(model)) == meta["state_dict_sha256"]
    model.load_state_dict(state, strict=True)

    tol = meta["tolerance"]
    f64_key, f32_key = tol["float64"]["compare_to"], tol["float32"]["compare_to"]
    out64 = _run(model, tensors, torch.float64)
    assert out64.dtype == torch.float64
    assert out64.shape == tensors[f64_key].shape
    err64 = (out64 - tensors[f64_key].double()).abs().max().item()
    assert err64 <= tol["float64"]["max_abs_diff"], f"float64 max abs diff {err64:.3e}"

    out32 = _run(model, tensors, torch.float32)
    err32 = (out32.double() - tensors[f32_key].double()).abs().max().item()
    assert err32 <= tol["float32"]["max_abs_diff"], f"float32 max abs diff {err32:.3e}"


@pytest.mark.parametrize(
    "name,label,build",
    [(n, label, b) for n, builds in FULL_BUILDERS.items() for label, b in builds],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_full_size_layout_matches_manifest(
    public_fixtures: Path, name: str, label: str, build: Callable[[dict], nn.Module]
) -> None:
    manifest = _json(public_fixtures, name, "manifest")
    with torch.device("meta"):
        model = build(manifest)
    mine = layout(model)
    expected = [(k, list(s), d) for k, s, d, _ in manifest["state_dict"]]
    assert {k for k, _, _ in mine} == {k for k, _, _ in expected}, "key sets differ"
    assert mine == expected, "shapes, dtypes or order differ"
    assert layout_sha256(mine) == manifest["state_dict_sha256"]
    params = {k for k, _ in model.named_parameters()}
    kinds = {k: kind for k, _, _, kind in manifest["state_dict"]}
    assert all((kinds[k] == "param") == (k in params) for k in kinds)
    assert sum(p.numel() for p in model.parameters()) == manifest["total_parameter_count"]
    if "ema_shadow_params_order" in manifest:
        order = manifest["ema_shadow_params_order"]["keys"]
        assert [k for k, _ in model.named_parameters()] == order


def test_wrn_70_16_variant_layout() -> None:
    """DiffPure's WRN-70-16: same class, 11 blocks per stage, widths 256/512/1024, and the
    CIFAR-10 normalisation lives outside the state_dict."""
    with torch.device("meta"):
        model = wrn_70_16()
    keys = set(model.state_dict())
    assert "block3.layer.10.conv2.weight" in keys and "block3.layer.11.conv2.weight" not in keys
    assert model.state_dict()["fc.weight"].shape == (10, 1024)
    assert not any(k in keys for k in ("mean", "std"))
    assert sum(1 for k in keys if k.endswith("convShortcut.weight")) == 3
    # Same key pattern as WRN-28-10 apart from the number of blocks per stage.
    with torch.device("meta"):
        small = WideResNet(depth=70, widen_factor=2)
    assert set(small.state_dict()) == keys


def test_wrn_normalisation_and_dropout() -> None:
    torch.manual_seed(0)
    plain = WideResNet(depth=10, widen_factor=1).eval()
    norm = WideResNet(depth=10, widen_factor=1, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    norm.load_state_dict(plain.state_dict())
    norm.eval()
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), plain((x - mean) / std))
    drop = WideResNet(depth=10, widen_factor=1, dropout=0.3)
    drop.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(drop.eval()(x), plain(x))


def test_networks_are_differentiable_in_the_input() -> None:
    torch.manual_seed(0)
    net = NCSNpp(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    net.eval()(x, torch.tensor([10.0, 500.0])).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_ncsnpp_rejects_unsupported_options() -> None:
    with pytest.raises(ValueError, match="progressive"):
        NCSNpp.from_score_sde_config({"model": {"progressive": "output_skip"}})
