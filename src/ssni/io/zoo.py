"""Registries of the paper's public models and datasets, kept as data. Local files only.

* :data:`SCORE_MODELS`: ``load_score_model(name, path)`` -> :class:`~ssni.core.score.ScoreModel`.
* :data:`CLASSIFIERS`: ``load_classifier(name, path)`` -> ``nn.Module`` taking images in [0, 1].
* :data:`DATASETS`: ``load_data(name, root, **kw)`` -> ``(x, y)`` (the one dataset registry,
  :mod:`ssni.data.registry`, re-exported here).

Every entry says where its file comes from; nothing is downloaded. Checkpoints are read without
running code (see :mod:`ssni.io.checkpoints`); a missing, corrupt or mismatched file raises
:class:`~ssni.io.checkpoints.CheckpointError`. Returned models are in eval mode with
``requires_grad=False`` parameters (gradients still flow to the inputs).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Optional, Tuple, Union

from torch import nn

from ..core.diffusion import VPSchedule
from ..core.score import EpsilonNetwork, ScoreModel
from ..data.registry import DATASETS, DatasetEntry, load_data
from ..nets import _torchvision_models, build_network
from ..nets.wrn import CIFAR10_MEAN, CIFAR10_STD
from .adapters import IMAGENET_MEAN, IMAGENET_STD, Normalized, Resized, load_diffusers_unet
from .checkpoints import (
    copy_parameters_in_order,
    load_state_dict_strict,
    read_checkpoint,
    select_entry,
    strip_prefixes,
)

__all__ = [
    "ScoreModelEntry",
    "ClassifierEntry",
    "DatasetEntry",
    "SCORE_MODELS",
    "CLASSIFIERS",
    "DATASETS",
    "load_score_model",
    "load_classifier",
    "load_data",
    "build_network",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

@dataclass(frozen=True)
class ScoreModelEntry:
    """A public diffusion checkpoint and how to call it.

    ``format``: ``"score_sde"`` (dict with ``model`` + EMA ``shadow_params``), ``"state_dict"``
    or ``"diffusers"`` (a folder). The adapter is ``EpsilonNetwork(net, VPSchedule(**schedule),
    time_scale=..., integer_time=..., out_channels=..., time_offset=...)``: the time label the
    network was trained with (score_sde continuous: ``999 t``; 0-based discrete DDPMs: ``k - 1``
    for ``t = k / 1000``).
    """

    summary: str
    file: str
    source: str
    architecture: str
    config: Mapping[str, Any]
    format: str
    image_size: int
    time_scale: float = 999.0
    integer_time: bool = False
    out_channels: Optional[int] = None
    time_offset: float = 0.0
    schedule: Mapping[str, Any] = field(default_factory=dict)
    optional_keys: Tuple[str, ...] = ()


@dataclass(frozen=True)
class ClassifierEntry:
    """A public classifier checkpoint. The returned module takes images in [0, 1] of
    ``input_size`` (others are resized bilinearly when ``resize`` is true)."""

    summary: str
    file: str
    source: str
    architecture: str
    config: Mapping[str, Any]
    input_size: int
    num_classes: int
    entries: Tuple[str, ...] = ("state_dict",)
    prefixes: Tuple[str, ...] = ("module.", "model.")
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    resize: bool = False


_VP = {"beta_min": 0.1, "beta_max": 20.0, "num_steps": 1000}

SCORE_MODELS: Mapping[str, ScoreModelEntry] = MappingProxyType(
    {
        "cifar10-ddpmpp": ScoreModelEntry(
            summary="score_sde DDPM++ deep continuous VP model, CIFAR-10 32x32 (DiffPure, SSNI)",
            file="checkpoint_8.pth",
            source="yang-song/score_sde_pytorch checkpoints, vp/cifar10_ddpmpp_deep_continuous/"
            "checkpoint_8.pth (DiffPure keeps it at pretrained/score_sde/checkpoint_8.pth)",
            architecture="ncsnpp",
            config=MappingProxyType({}),  # NCSNpp defaults are this model
            format="score_sde",
            image_size=32,
            time_scale=999.0,
            integer_time=False,
            schedule=MappingProxyType(dict(_VP, discrete=False)),
            optional_keys=("sigmas",),
        ),
        "imagenet-guided-256-uncond": ScoreModelEntry(
            summary="guided-diffusion ADM 256x256 unconditional ImageNet model (DiffPure, SSNI)",
            file="256x256_diffusion_uncond.pt",
            source="openai/guided-diffusion README, 'ImageNet 256x256 (unconditional)' "
            "(openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt)",
            architecture="guided_unet",
            config=MappingProxyType({}),  # GuidedUNet defaults are this model
            format="state_dict",
            image_size=256,
            time_scale=1000.0,
            integer_time=True,
            time_offset=1.0,  # trained with the 0-based index k - 1 for alpha_bar_k
            out_channels=3,
            schedule=MappingProxyType(dict(_VP, discrete=True)),
        ),
        "diffusers": ScoreModelEntry(
            summary="any local diffusers DDPM folder (UNet2DModel + scheduler config)",
            file="<folder>",
            source="a diffusers pipeline saved with save_pretrained(), e.g. google/ddpm-cifar10-32",
            architecture="diffusers",
            config=MappingProxyType({}),
            format="diffusers",
            image_size=0,
        ),
    }
)

CLASSIFIERS: Mapping[str, ClassifierEntry] = MappingProxyType(
    {
        "cifar10-wrn-28-10": ClassifierEntry(
            summary="RobustBench CIFAR-10 'Standard' WRN-28-10 (not adversarially trained)",
            file="Standard.pt",
            source="RobustBench model zoo, cifar10 / Linf / Standard (the file robustbench's "
            "load_model downloads into models/cifar10/Linf/Standard.pt)",
            architecture="wide_resnet",
            config=MappingProxyType({"depth": 28, "widen_factor": 10}),
            input_size=32,
            num_classes=10,
        ),
        "cifar10-wrn-70-16": ClassifierEntry(
            summary="DiffPure's CIFAR-10 WRN-70-16 with dropout 0.3 (classifier "
            "'cifar10-wrn-70-16-dropout'); normalises inputs with CIFAR-10 mean/std inside",
            file="weights.pt",
            source="DiffPure's pretrained/cifar10/wrn-70-16-dropout/weights.pt (its README "
            "lists no public link; obtain it from the DiffPure or SSNI authors)",
            architecture="wide_resnet",
            config=MappingProxyType(
                {
                    "depth": 70,
                    "widen_factor": 16,
                    "dropout": 0.3,
                    "mean": CIFAR10_MEAN,
                    "std": CIFAR10_STD,
                }
            ),
            input_size=32,
            num_classes=10,
        ),
        **{
            f"imagenet-{arch.replace('_', '-')}": ClassifierEntry(
                summary=f"torchvision {arch} for ImageNet (224x224), mean/std folded in",
                file=f"{arch}-<hash>.pth",
                source="torchvision's weight URL for this model (e.g. IMAGENET1K_V1), saved by "
                "torch.hub into ~/.cache/torch/hub/checkpoints/",
                architecture="resnet",  # torchvision's layout; torchvision itself not needed
                config=MappingProxyType(dict(config, num_classes=1000)),
                input_size=224,
                num_classes=1000,
                entries=(),
                prefixes=("module.",),
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                resize=True,
            )
            for arch, config in (
                ("resnet50", {"block": "bottleneck", "layers": (3, 4, 6, 3)}),
                ("resnet18", {"block": "basic", "layers": (2, 2, 2, 2)}),
                ("resnet101", {"block": "bottleneck", "layers": (3, 4, 23, 3)}),
                (
                    "wide_resnet50_2",
                    {"block": "bottleneck", "layers": (3, 4, 6, 3), "width_per_group": 128},
                ),
            )
        },
    }
)

def _lookup(registry: Mapping[str, Any], name: str, kind: str) -> Any:
    if name not in registry:
        raise KeyError(f"unknown {kind} {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_score_sde(net: nn.Module, ckpt: Any, source: str, entry: ScoreModelEntry,
                    use_ema: bool) -> None:
    """score_sde's ``checkpoint_*.pth``: ``{'model': DataParallel state_dict, 'ema':
    {'shadow_params': [...]}, 'optimizer', 'step'}``; the EMA weights are the ones used."""
    if isinstance(ckpt, Mapping) and "model" in ckpt:
        state = strip_prefixes(ckpt["model"], ("module.",))
        load_state_dict_strict(
            net, state, source=f"{source} ['model']", optional=entry.optional_keys
        )
        ema = ckpt.get("ema")
        shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
        if use_ema and shadow is not None:
            copy_parameters_in_order(net, shadow, source=f"{source} ['ema']['shadow_params']")
            log.info("%s: loaded the EMA weights", source)
        elif use_ema:
            log.warning("%s: no EMA weights in the file, using ['model']", source)
        return
    # A bare state_dict (e.g. EMA weights already extracted, or a safetensors copy).
    state = strip_prefixes(select_entry(ckpt, ("state_dict",), source=source), ("module.",))
    load_state_dict_strict(net, state, source=source, optional=entry.optional_keys)


def load_score_model(
    name: Union[str, ScoreModelEntry], path: PathLike, *, use_ema: bool = True
) -> ScoreModel:
    """Load the public diffusion checkpoint ``path`` as registry entry ``name``.

    Args:
        name: a key of :data:`SCORE_MODELS` (``"cifar10-ddpmpp"``,
            ``"imagenet-guided-256-uncond"``, ``"diffusers"``) or a :class:`ScoreModelEntry`.
        path: the file as its owner distributes it (``.pt``/``.pth`` read with
            ``weights_only=True``, or ``.safetensors``); a folder for ``"diffusers"``.
        use_ema: score_sde files: use the EMA weights (as DiffPure and score_sde do).

    Returns:
        A :class:`~ssni.core.score.ScoreModel` on the CPU in eval mode: ``eps(x, t)`` with ``x`` in
        [-1, 1] ``(B, C, H, W)`` and ``t`` ``(B,)`` in [0, 1].
    """
    entry: ScoreModelEntry = (
        name if isinstance(name, ScoreModelEntry) else _lookup(SCORE_MODELS, name, "score model")
    )
    if entry.format == "diffusers":
        return _freeze(load_diffusers_unet(path))  # type: ignore[return-value]
    ckpt = read_checkpoint(path)
    net = build_network(entry.architecture, entry.config)
    source = f"{os.fspath(path)}"
    if entry.format == "score_sde":
        _load_score_sde(net, ckpt, source, entry, use_ema)
    else:
        state = strip_prefixes(select_entry(ckpt, ("state_dict",), source=source), ("module.",))
        load_state_dict_strict(net, state, source=source, optional=entry.optional_keys)
    model = EpsilonNetwork(
        net,
        VPSchedule(**dict(entry.schedule)),
        time_scale=entry.time_scale,
        integer_time=entry.integer_time,
        out_channels=entry.out_channels,
        time_offset=entry.time_offset,
    )
    if entry.image_size:
        model.image_shape = (3, entry.image_size, entry.image_size)
    return _freeze(model)  # type: ignore[return-value]


def load_classifier(name: Union[str, ClassifierEntry], path: PathLike) -> nn.Module:
    """Load the public classifier checkpoint ``path`` as registry entry ``name``.

    Args:
        name: a key of :data:`CLASSIFIERS` (``"cifar10-wrn-28-10"``, ``"cifar10-wrn-70-16"``,
            ``"imagenet-resnet50"``, ...) or a :class:`ClassifierEntry`. The ImageNet ResNets
            are this library's own implementation with torchvision's layout (no torchvision
            needed); ``torchvision:<name>`` architectures in custom entries need it.
        path: the weights file (``weights_only`` pickle or ``.safetensors``). A wrapping
            ``state_dict`` entry and ``module.`` / ``model.`` key prefixes are removed.

    Returns:
        ``nn.Module`` on the CPU in eval mode mapping images ``(B, 3, H, W)`` in [0, 1] to logits
        ``(B, num_classes)``; normalisation (and, for ImageNet, resizing to 224) is inside.
    """
    entry: ClassifierEntry = (
        name if isinstance(name, ClassifierEntry) else _lookup(CLASSIFIERS, name, "classifier")
    )
    label = name if isinstance(name, str) else entry.summary
    if entry.architecture.startswith("torchvision:"):
        _torchvision_models(entry.architecture)  # fail early and clearly without torchvision
    ckpt = read_checkpoint(path)
    net = build_network(entry.architecture, entry.config)
    source = os.fspath(path)
    state = strip_prefixes(select_entry(ckpt, entry.entries, source=source), entry.prefixes)
    arch = f"{label} ({entry.architecture})"
    load_state_dict_strict(net, state, source=source, architecture=arch)
    model: nn.Module = net
    if entry.mean is not None and entry.std is not None:
        model = Normalized(model, entry.mean, entry.std)
    if entry.resize:
        model = Resized(model, entry.input_size)
    return _freeze(model)
