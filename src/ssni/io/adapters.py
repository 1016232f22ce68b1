"""Adapters beyond :class:`ssni.core.score.EpsilonNetwork`: diffusers UNets as score models, and
classifier input wrappers (mean/std normalisation, resizing).

``EpsilonNetwork`` already covers the score_sde and guided-diffusion checkpoints (time labels
and the learned-sigma channel split); the registry in :mod:`ssni.io.zoo` sets them up.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.diffusion import VPSchedule, expand_like
from ..core.purifiers import Purification, Purifier
from ..core.score import ScoreModel

__all__ = [
    "DiffusersUNet",
    "load_diffusers_unet",
    "Normalized",
    "Resized",
    "ResizedPurifier",
    "resize_images",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PathLike = Union[str, "os.PathLike[str]"]


def resize_images(x: Tensor, size: Union[int, Tuple[int, int]]) -> Tensor:
    """Bilinear resize of ``(B, C, H, W)`` images to ``size`` (``align_corners=False``, no
    antialiasing: DiffPure's 224 <-> 256 ImageNet path). Differentiable; no-op at equal size."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == hw:
        return x
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False)


def _accepts(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward`` takes a keyword argument ``name``."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class Normalized(nn.Module):
    """``module((x - mean) / std)``: folds a classifier's input normalisation into the model, so
    it takes images in [0, 1]. ``mean``/``std`` are per-channel (non-persistent buffers)."""

    def __init__(self, module: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.module = module
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.module((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


class Resized(nn.Module):
    """``module(resize(x, size), *args)``, optionally resizing the output back to the input size.

    For a classifier trained at 224 fed with 256 diffusion outputs: ``Resized(net, 224)``.
    For a purifier at 256 on 224 images: ``Resized(purifier, 256, restore=True)``.
    """

    def __init__(
        self, module: nn.Module, size: Union[int, Tuple[int, int]], restore: bool = False
    ) -> None:
        super().__init__()
        self.module = module
        self.size = size
        self.restore = bool(restore)
        self._takes_generator = _accepts(module, "generator")

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not self._takes_generator:
            kwargs.pop("generator", None)  # e.g. a classifier asked for one stochastic pass
        out = self.module(resize_images(x, self.size), *args, **kwargs)
        return resize_images(out, tuple(x.shape[-2:])) if self.restore else out


class ResizedPurifier(Purifier):
    """Run ``purifier`` at ``size`` and return images at the input size (bilinear both ways).

    DiffPure's ImageNet path: 224x224 images (the attack space) -> 256 for the guided-diffusion
    model -> back to 224 for the classifier. Differentiable like the wrapped purifier.
    """

    def __init__(self, purifier: Purifier, size: Union[int, Tuple[int, int]] = 256) -> None:
        super().__init__()
        self.purifier = purifier
        self.size = size

    def extra_repr(self) -> str:
        return f"size={self.size}"

    def run(
        self, x: Tensor, t: Union[float, Tensor], generator: Optional[torch.Generator] = None
    ) -> Purification:
        out = self.purifier.run(resize_images(x, self.size), t, generator=generator)
        return Purification(resize_images(out.x, tuple(x.shape[-2:])), out.nfe)


class DiffusersUNet(ScoreModel):
    """A diffusers ``UNet2DModel`` (DDPM-style, discrete time) as a score model.

    The network gets the 0-based timestep it was trained with, ``round(t * N) - 1`` for
    ``alpha_bar(t) = prod_{j <= t N} (1 - beta_j)`` (``N = num_train_timesteps``; diffusers'
    ``DDPMScheduler`` adds noise at ``alphas_cumprod[k - 1]`` with label ``k - 1``), and its
    output is turned into eps:
    ``epsilon`` as is, ``sample`` (x0) via ``(x - sqrt(a) x0) / sigma``, ``v_prediction`` via
    ``sqrt(a) v + sigma x``, with ``a = alpha_bar(t)`` of ``schedule``.

    Args:
        unet: the diffusers model, called as ``unet(x, timesteps).sample``.
        schedule: the discrete VP schedule it was trained with.
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        out_channels: keep the first channels only (learned-variance models).
    """

    def __init__(
        self,
        unet: nn.Module,
        schedule: Optional[VPSchedule] = None,
        *,
        prediction_type: str = "epsilon",
        out_channels: Optional[int] = None,
    ) -> None:
        super().__init__(schedule if schedule is not None else VPSchedule(discrete=True))
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        self.unet = unet
        self.prediction_type = prediction_type
        self.out_channels = out_channels

    def timesteps(self, t: Tensor) -> Tensor:
        """Integer-valued network timesteps ``round(t * N) - 1`` (at least 0) as float, ``(B,)``."""
        return (torch.round(t.detach() * self.schedule.num_steps) - 1.0).clamp_min(0.0)

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.unet(x, self.timesteps(t).to(x.dtype))
        out = getattr(out, "sample", out)
        if self.out_channels is not None:
            out = out[:, : self.out_channels]
        if self.prediction_type == "epsilon":
            return out
        a = expand_like(self.schedule.alpha_bar(t).to(x.dtype), x)
        sigma = (1.0 - a).clamp_min(1e-20).sqrt()
        if self.prediction_type == "sample":
            return (x - a.sqrt() * out) / sigma
        return a.sqrt() * out + sigma * x


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_diffusers_unet(folder: PathLike) -> DiffusersUNet:
    """Load a local diffusers DDPM folder (pipeline folder with ``unet/`` and ``scheduler/``, or a
    bare ``UNet2DModel`` folder with ``config.json``) as a :class:`DiffusersUNet`.

    Never downloads (``local_files_only``). The scheduler config gives the schedule (only
    ``beta_schedule="linear"`` is supported) and ``prediction_type``; without one, DDPM's
    defaults are used (1000 steps, betas 1e-4 to 2e-2, epsilon). Requires ``ssni[diffusers]``.
    """
    from .checkpoints import CheckpointError, CheckpointNotFoundError

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"diffusers model folder not found: {folder}")
    try:
        from diffusers import UNet2DModel
    except ImportError as err:
        raise ImportError(
            "loading a diffusers model needs the 'diffusers' package: pip install 'ssni[diffusers]'"
        ) from err
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if not (unet_dir / "config.json").is_file():
        raise CheckpointNotFoundError(
            f"{folder} is not a diffusers model folder (no config.json, no unet/config.json)"
        )
    sched_cfg: dict = {}
    for candidate in (folder / "scheduler" / "scheduler_config.json",
                      folder / "scheduler_config.json"):
        if candidate.is_file():
            sched_cfg = _read_json(candidate)
            break
    else:
        log.info("%s: no scheduler config, assuming DDPM's linear schedule", folder)
    if sched_cfg.get("beta_schedule", "linear") != "linear":
        raise CheckpointError(
            f"{folder}: beta_schedule {sched_cfg['beta_schedule']!r} is not supported (linear only)"
        )
    steps = int(sched_cfg.get("num_train_timesteps", 1000))
    schedule = VPSchedule(
        beta_min=float(sched_cfg.get("beta_start", 1e-4)) * steps,
        beta_max=float(sched_cfg.get("beta_end", 0.02)) * steps,
        num_steps=steps,
        discrete=True,
    )
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot load the diffusers UNet in {unet_dir}: {err}") from err
    in_ch = int(unet.config.in_channels)
    out_ch = int(unet.config.out_channels)
    model = DiffusersUNet(
        unet,
        schedule,
        prediction_type=str(sched_cfg.get("prediction_type", "epsilon")),
        out_channels=in_ch if out_ch == 2 * in_ch else None,
    )
    return model.eval()
