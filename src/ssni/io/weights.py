"""Weight files of the networks this package trains: safetensors with an ``"ssni"`` metadata key.

The metadata is a JSON string with the architecture (a key of :data:`ssni.nets.ARCHITECTURES`)
and its kwargs, the schedule and time scale of a score model, data provenance and the command
that produced the file. Loading never runs code from the file; models come back on the CPU in
eval mode with ``requires_grad=False``.
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
from ..nets import build_network

__all__ = [
    "METADATA_KEY",
    "TIME_SCALE",
    "save_weights",
    "read_metadata",
    "load_score_model_file",
    "load_classifier_file",
]

PathLike = Union[str, "os.PathLike[str]"]

METADATA_KEY = "ssni"
TIME_SCALE = 1000.0
FORMAT_VERSION = 1


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


def read_metadata(path: PathLike) -> Dict[str, Any]:
    """The ``"ssni"`` metadata dictionary of a weights file written by :func:`save_weights`."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if METADATA_KEY not in meta:
        raise ValueError(f"{path} has no '{METADATA_KEY}' metadata; not an ssni weights file")
    return json.loads(meta[METADATA_KEY])


def _load_net(path: PathLike, kind: str) -> Tuple[nn.Module, Dict[str, Any]]:
    meta = read_metadata(path)
    if meta.get("kind") != kind:
        raise ValueError(f"{path} holds a {meta.get('kind')!r}, not a {kind!r}")
    net = build_network(meta["arch"], meta["arch_kwargs"])
    net.load_state_dict(load_file(str(path)))
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, meta


def load_score_model_file(path: PathLike) -> EpsilonNetwork:
    """Rebuild the score model of a weights file as an :class:`~ssni.core.score.EpsilonNetwork`.

    The network, schedule and time scale come from the file's metadata; CPU, eval mode.
    """
    net, meta = _load_net(path, "score_model")
    schedule = VPSchedule(**meta.get("schedule", {}))
    model = EpsilonNetwork(net, schedule, time_scale=float(meta.get("time_scale", TIME_SCALE)))
    return model.eval()


def load_classifier_file(path: PathLike) -> nn.Module:
    """Rebuild the classifier of a weights file (input ``(B, C, H, W)`` in [0, 1]); CPU, eval."""
    net, _ = _load_net(path, "classifier")
    return net
