"""The resumable JSONL log of an evaluation and the fingerprints that make up its configuration.

Line 1 is ``{"kind": "config", "format": LOG_FORMAT, "config": ...}``; each finished sample adds a
``{"kind": "sample", ...}`` line (flushed), the undefended check a ``{"kind": "undefended"}`` line.
A log written by another configuration is refused; a last line cut short by a kill is dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["LOG_FORMAT", "RunLog", "fingerprint_module", "fingerprint_data", "jsonable"]

logger = logging.getLogger(__name__)

LOG_FORMAT = 1


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def fingerprint_module(module: Optional[nn.Module]) -> Optional[str]:
    if module is None or not isinstance(module, nn.Module):
        return None
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(value.dtype).encode())
        h.update(str(tuple(value.shape)).encode())
        h.update(_tensor_bytes(value))
    return h.hexdigest()


def fingerprint_data(x: Tensor, y: Tensor) -> str:
    h = hashlib.sha256()
    for t in (x, y):
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def jsonable(obj):
    return json.loads(json.dumps(obj, sort_keys=True))


class RunLog:
    """Append-only JSONL log: a config line, then sample (and undefended-check) lines."""

    def __init__(self, path: Optional[Union[str, os.PathLike]], config: dict) -> None:
        self.path = None if path is None else os.fspath(path)
        self.config = config
        self.samples: Dict[Tuple[int, int], dict] = {}
        self.undefended: Optional[dict] = None
        self._file = None
        if self.path is None:
            return
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            self._load()
        else:
            parent = os.path.dirname(self.path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            self._file = open(self.path, "w")
            self._write({"kind": "config", "format": LOG_FORMAT, "config": config})
        if self._file is None:
            self._file = open(self.path, "a")

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            raw = f.read()
        end = raw.rfind(b"\n") + 1
        if end < len(raw):  # a line cut short by a kill: drop it
            logger.info("dropping an incomplete last line of %s", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(end)
        lines = raw[:end].splitlines()
        if not lines:
            self._file = open(self.path, "w")
            self._write({"kind": "config", "format": LOG_FORMAT, "config": self.config})
            return
        try:
            head = json.loads(lines[0])
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.path} is not an evaluation log") from err
        if head.get("kind") != "config" or head.get("format") != LOG_FORMAT:
            raise ValueError(f"{self.path} is not an evaluation log of format {LOG_FORMAT}")
        if head["config"] != self.config:
            keys = sorted(
                k
                for k in set(head["config"]) | set(self.config)
                if head["config"].get(k) != self.config.get(k)
            )
            raise ValueError(
                f"{self.path} was written by another configuration (differs in {keys}); "
                "use a new log path or delete the old log"
            )
        for i, line in enumerate(lines[1:], start=2):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path}: line {i} is not valid JSON") from err
            if rec.get("kind") == "sample":
                self.samples.setdefault((rec["seed"], rec["index"]), rec["record"])
            elif rec.get("kind") == "undefended":
                self.undefended = rec["result"]

    def _write(self, obj: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(obj, sort_keys=True) + "\n")
        self._file.flush()

    def add_sample(self, record: dict) -> None:
        key = (record["seed"], record["index"])
        if key in self.samples:
            return
        record = jsonable(record)
        self.samples[key] = record
        self._write({"kind": "sample", "seed": key[0], "index": key[1], "record": record})

    def set_undefended(self, result: dict) -> None:
        self.undefended = jsonable(result)
        self._write({"kind": "undefended", "result": self.undefended})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
