"""Weight files of the networks this package trains: safetensors with an ``"ssni"`` metadata key.

The metadata is a JSON string with the architecture (a key of :data:`ssni.nets.ARCHITECTURES`)
and its kwargs, the schedule and time scale of a score model, data provenance and the command
that produced the file. Loading never runs code from the file; models come back on the CPU in
eval mode with ``requires_grad=False`` and ``image_shape`` ``(C, H, W)`` (the size of the images
they were trained on, when the file says so). A missing, truncated, random, pickled or
mismatched file raises one :class:`~ssni.io.checkpoints.CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.diffusion import VPSchedule
from ..core.score import EpsilonNetwork
from ..errors import one_line
from ..nets import build_network
from .checkpoints import CheckpointError, CheckpointNotFoundError


class WeightFileError(CheckpointError, ValueError):
    """A weights file that is not a usable ssni weights file (one line naming the file)."""

__all__ = [
    "SHIPPED_WEIGHTS",
    "find_weights",
    "METADATA_KEY",
    "TIME_SCALE",
    "save_weights",
    "read_metadata",
    "load_score_model_file",
    "load_classifier_file",
    "image_shape",
    "WeightFileError",
]

PathLike = Union[str, "os.PathLike[str]"]

METADATA_KEY = "ssni"
TIME_SCALE = 1000.0
FORMAT_VERSION = 1


#: Weights shipped inside the package (``ssni/weights/``): name -> (file name, kind).
SHIPPED_WEIGHTS: Dict[str, Tuple[str, str]] = {
    "fmnist-unet": ("fmnist_unet.safetensors", "score_model"),
    "fmnist-cnn": ("fmnist_cnn.safetensors", "classifier"),
}


def find_weights(filename: str) -> Path:
    """``./weights/<filename>`` in the working directory, else the copy shipped inside the
    package (``ssni/weights/<filename>``); ``FileNotFoundError`` naming both places."""
    from importlib.resources import files

    shipped = Path(str(files("ssni") / "weights"))
    candidates = [Path.cwd() / "weights" / filename, shipped / filename]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"weights/{filename} not found (looked in {', '.join(str(c.parent) for c in candidates)});"
        " train it with `ssni train-score`/`ssni train-classifier` or pass its path"
    )


def _jsonable(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps({k: list(v) if isinstance(v, tuple) else v
                                  for k, v in kwargs.items()}))


def save_weights(
    path: PathLike,
    model: nn.Module,
    *,
    arch: str,
    arch_kwargs: Dict[str, Any],
    kind: str,
    info: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Write ``model``'s state dict to a safetensors file with metadata under ``"ssni"``.

    Args:
        kind: ``"score_model"`` or ``"classifier"``.
        info: extra JSON-able entries (schedule, time_scale, data, training config, command, ...).

    Returns:
        The metadata dictionary written.
    """
    if kind not in ("score_model", "classifier"):
        raise ValueError(f"kind must be 'score_model' or 'classifier', got {kind!r}")
    meta = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "arch": arch,
        "arch_kwargs": _jsonable(arch_kwargs),
        "parameters": sum(p.numel() for p in model.parameters()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(info or {}),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)
    return meta


def _check_file(path: PathLike) -> None:
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise WeightFileError(f"{path} is a folder, not a weights file")


def read_metadata(path: PathLike) -> Dict[str, Any]:
    """The ``"ssni"`` metadata dictionary of a weights file written by :func:`save_weights`."""
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...: one clear line
        raise WeightFileError(
            f"{path} is not a readable safetensors weights file ({one_line(err)})"
        ) from None
    if METADATA_KEY not in meta:
        raise WeightFileError(f"{path} has no '{METADATA_KEY}' metadata; not an ssni weights file")
    try:
        doc = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as err:
        msg = f"{path}: its '{METADATA_KEY}' metadata is not JSON ({err})"
        raise WeightFileError(msg) from None
    if not isinstance(doc, dict) or not all(k in doc for k in ("kind", "arch", "arch_kwargs")):
        raise WeightFileError(f"{path}: its '{METADATA_KEY}' metadata lacks kind/arch/arch_kwargs")
    return doc


#: Image shapes ``(C, H, W)`` of the datasets weight files name as their training data.
DATASET_SHAPES = {"fashion-mnist": (1, 28, 28), "digits": (1, 8, 8), "cifar10": (3, 32, 32)}


def image_shape(meta: Dict[str, Any]) -> Optional[Tuple[int, int, int]]:
    """``(C, H, W)`` of the images a weights file's network was trained on, if known."""
    shape = meta.get("image_shape")
    if shape is None:
        shape = DATASET_SHAPES.get(str((meta.get("data") or {}).get("name", "")))
    return None if shape is None else tuple(int(v) for v in shape)


def _load_net(path: PathLike, kind: str) -> Tuple[nn.Module, Dict[str, Any]]:
    meta = read_metadata(path)
    if meta.get("kind") != kind:
        raise WeightFileError(f"{path} holds a {meta.get('kind')!r}, not a {kind!r}")
    try:
        net = build_network(meta["arch"], meta["arch_kwargs"])
        state = load_file(str(path))
        net.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - truncated data, wrong keys or shapes
        raise WeightFileError(f"cannot load {path}: {one_line(err)}") from None
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    net.image_shape = image_shape(meta)
    return net, meta


def load_score_model_file(path: PathLike) -> EpsilonNetwork:
    """Rebuild the score model of a weights file as an :class:`~ssni.core.score.EpsilonNetwork`.

    The network, schedule and time scale come from the file's metadata; CPU, eval mode.
    """
    net, meta = _load_net(path, "score_model")
    schedule = VPSchedule(**meta.get("schedule", {}))
    model = EpsilonNetwork(net, schedule, time_scale=float(meta.get("time_scale", TIME_SCALE)))
    model.image_shape = net.image_shape
    return model.eval()


def load_classifier_file(path: PathLike) -> nn.Module:
    """Rebuild the classifier of a weights file (input ``(B, C, H, W)`` in [0, 1]); CPU, eval."""
    net, _ = _load_net(path, "classifier")
    return net
