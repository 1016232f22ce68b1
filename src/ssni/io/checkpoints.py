"""Safe checkpoint reading and strict, explained loading.

* Files are read with ``torch.load(weights_only=True)`` (tensors, containers and numbers only:
  a pickle that would import or call code is refused) or, for ``.safetensors``, with
  ``safetensors``. Nothing is ever downloaded.
* Every failure (missing file, unreadable or corrupt file, file carrying code, checkpoint of
  another architecture) raises :class:`CheckpointError` with one message that names the file and,
  for a layout mismatch, a few missing / unexpected / mis-shaped keys.
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "read_checkpoint",
    "select_entry",
    "strip_prefixes",
    "check_state_dict",
    "load_state_dict_strict",
    "copy_parameters_in_order",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
_SHOW = 5


class CheckpointError(RuntimeError):
    """A checkpoint could not be used; the message says which file and why."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


def read_checkpoint(path: PathLike) -> Any:
    """Read a checkpoint file onto the CPU without running code.

    ``.safetensors`` files give a ``dict[str, Tensor]``; anything else is read with
    ``torch.load(..., weights_only=True)`` and gives whatever containers it holds.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"cannot read {path}: corrupt safetensors file ({err})") from err
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _detail(err)
        if "global" in detail.lower():
            raise CheckpointError(
                f"refusing to load {path}: it carries code or objects other than tensors and "
                f"plain containers ({detail}); only weights are accepted (torch.load with "
                "weights_only=True, or safetensors). Re-save its state_dict from a trusted "
                "environment."
            ) from err
        raise CheckpointError(
            f"cannot read {path}: corrupt, not a PyTorch checkpoint, or a pickle that "
            f"weights-only loading refuses ({detail})"
        ) from err
    except Exception as err:  # a damaged file can fail anywhere inside the unpickler
        raise CheckpointError(
            f"cannot read {path}: corrupt or not a PyTorch checkpoint ({_detail(err)})"
        ) from err


def _detail(err: BaseException) -> str:
    """The informative line of a (long, multi-line) torch.load error."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln or "global" in ln:
            return ln
    return lines[0][:300] if lines else type(err).__name__


def select_entry(obj: Any, entries: Sequence[str], *, source: str = "checkpoint") -> Any:
    """Return ``obj[e]`` for the first ``e`` of ``entries`` present, else ``obj`` itself.

    Many checkpoints wrap the state_dict (``{"state_dict": ...}``, ``{"model": ...}``).
    """
    if isinstance(obj, Mapping):
        for entry in entries:
            if entry in obj and isinstance(obj[entry], Mapping):
                log.debug("%s: using entry %r", source, entry)
                return obj[entry]
    return obj


def strip_prefixes(
    state_dict: Mapping[str, Any], prefixes: Iterable[str] = ("module.",)
) -> Dict[str, Any]:
    """Remove leading ``prefixes`` (repeatedly, e.g. DataParallel's ``module.``) from keys."""
    prefixes = tuple(prefixes)
    out: Dict[str, Any] = {}
    for key, value in state_dict.items():
        new = key
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if prefix and new.startswith(prefix):
                    new = new[len(prefix) :]
                    changed = True
        out[new] = value
    return out


def _fmt(keys: List[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def check_state_dict(
    module: nn.Module,
    state_dict: Any,
    *,
    source: str = "checkpoint",
    architecture: Optional[str] = None,
    optional: Iterable[str] = (),
) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` has exactly ``module``'s keys and
    shapes (keys in ``optional`` may be missing). The message lists a few offenders."""
    arch = architecture or type(module).__name__
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state_dict.items()
    ):
        raise CheckpointError(
            f"{source} is not a state_dict for {arch} (found {type(state_dict).__name__})"
        )
    expected = module.state_dict()
    optional = set(optional)
    missing = [k for k in expected if k not in state_dict and k not in optional]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_fmt(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_fmt(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (file vs model): {_fmt(shapes)}")
        raise CheckpointError(
            f"{source} does not match the {arch} architecture: " + "; ".join(parts)
        )


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Any,
    *,
    source: str = "checkpoint",
    architecture: Optional[str] = None,
    optional: Iterable[str] = (),
) -> nn.Module:
    """:func:`check_state_dict`, then ``module.load_state_dict`` (strict except ``optional``
    keys, which keep their constructed values). Returns ``module``."""
    optional = tuple(optional)
    check_state_dict(
        module, state_dict, source=source, architecture=architecture, optional=optional
    )
    result = module.load_state_dict(dict(state_dict), strict=False)
    left = [k for k in result.missing_keys if k not in optional]
    if left or result.unexpected_keys:  # pragma: no cover - guarded by check_state_dict
        raise CheckpointError(f"{source}: load_state_dict left keys unmatched: {_fmt(left)}")
    for key in result.missing_keys:
        log.info("%s: %r not in the file, keeping the constructed value", source, key)
    return module


def copy_parameters_in_order(
    module: nn.Module, tensors: Any, *, source: str = "checkpoint"
) -> nn.Module:
    """Copy a keyless list of tensors into ``module.parameters()`` in order (score_sde's EMA
    ``shadow_params``). Count and shapes are checked first."""
    params = list(module.named_parameters())
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, Tensor) for t in tensors):
        raise CheckpointError(f"{source}: expected a list of tensors, got {type(tensors).__name__}")
    if len(tensors) != len(params):
        raise CheckpointError(
            f"{source}: {len(tensors)} tensors for {len(params)} parameters of "
            f"{type(module).__name__}"
        )
    bad = [
        f"#{i} {name} {tuple(t.shape)} vs {tuple(p.shape)}"
        for i, ((name, p), t) in enumerate(zip(params, tensors))
        if tuple(t.shape) != tuple(p.shape)
    ]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} shape mismatches: {_fmt(bad)}")
    with torch.no_grad():
        for (_, p), t in zip(params, tensors):
            p.copy_(t)
    return module
