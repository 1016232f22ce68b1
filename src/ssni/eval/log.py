"""The resumable JSONL log of an evaluation and the fingerprints that make up its configuration.

Line 1 is ``{"kind": "config", "format": LOG_FORMAT, "config": ...}``; each finished sample adds a
``{"kind": "sample", ...}`` line (flushed), the undefended check a ``{"kind": "undefended"}`` line.
A log written by another configuration is refused (unless it holds no sample yet: then it is
replaced); a last line cut short by a kill is dropped. A damaged line before the end is refused
with a way out: ``repair=True`` keeps the log up to the last good line before it and drops the
rest (those samples are simply done again). While open, the log is locked
(:class:`ssni.io.lock.FileLock` on ``.<name>.lock`` beside it): a second writer fails at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..io.lock import FileLock

__all__ = [
    "LOG_FORMAT", "RunLog", "LogDamaged", "read_log", "fingerprint_module", "fingerprint_data",
    "jsonable",
]

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


class LogDamaged(ValueError):
    """A line before the end of a log is not a valid record (``line``: its 1-based number)."""

    def __init__(self, path: str, line: int, dropped: int) -> None:
        self.path, self.line, self.dropped = path, line, dropped
        super().__init__(
            f"{path}: line {line} is damaged (not a valid record); repair keeps lines "
            f"1-{line - 1} and does {dropped} logged sample(s) after it again "
            "(evaluate(..., repair_log=True); CLI: --set resume=repair)"
        )


def _parse(line: bytes) -> Optional[dict]:
    """One log line as a dict, or None when it is not a well-formed record."""
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict):
        return None
    kind = rec.get("kind")
    if kind == "sample":
        ok = isinstance(rec.get("record"), dict) and all(
            isinstance(rec.get(k), int) for k in ("seed", "index")
        )
        return rec if ok else None
    if kind == "undefended":
        return rec if "result" in rec else None
    return rec if isinstance(kind, str) and kind != "config" else None  # later kinds: ignored


Samples = Dict[Tuple[int, int], dict]


def _scan(path: str, raw: bytes, config: dict, repair: bool) -> Tuple[Optional[list], int]:
    """``(records, end)`` of the log bytes ``raw``: the valid records after the configuration
    line and the byte length they span (a last line cut short by a kill is not counted; with
    ``repair`` neither is a damaged line nor anything after it). ``records`` is None when the
    log should be started anew (empty, or another configuration's without any sample)."""
    end = raw.rfind(b"\n") + 1
    if end < len(raw):  # a line cut short by a kill: drop it
        logger.info("dropping an incomplete last line of %s", path)
    lines = raw[:end].split(b"\n")[:-1]
    if not lines:
        return None, end
    try:
        head = json.loads(lines[0])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not an evaluation log (line 1 is not JSON)") from None
    if not isinstance(head, dict) or head.get("kind") != "config" or "config" not in head:
        raise ValueError(f"{path} is not an evaluation log (no configuration line)")
    if head.get("format") != LOG_FORMAT:
        raise ValueError(
            f"{path} is an evaluation log of format {head.get('format')!r}, "
            f"this version reads format {LOG_FORMAT}"
        )
    records = []
    bad = None
    for i, line in enumerate(lines[1:], start=2):
        rec = _parse(line)
        if rec is None:
            bad = i
            break
        records.append(rec)
    if head["config"] != config:
        if not any(r["kind"] == "sample" for r in records) and bad is None:
            logger.info("%s holds no sample of another configuration: starting it anew", path)
            return None, end
        keys = sorted(
            k for k in set(head["config"]) | set(config) if head["config"].get(k) != config.get(k)
        )
        raise ValueError(
            f"{path} was written by another configuration (differs in {keys}); "
            "use a new log path or delete the old log"
        )
    if bad is not None:
        dropped = sum(1 for line in lines[bad:] if (_parse(line) or {}).get("kind") == "sample")
        if not repair:
            raise LogDamaged(path, bad, dropped)
        logger.warning(
            "%s: dropping damaged line %d and the %d line(s) after it (%d sample(s) to redo)",
            path, bad, len(lines) - bad, dropped,
        )
        end = sum(len(line) + 1 for line in lines[: bad - 1])
    return records, end


def _collect(records: list) -> Tuple[Samples, Optional[dict]]:
    samples: Samples = {}
    undefended = None
    for rec in records:
        if rec["kind"] == "sample":
            samples.setdefault((rec["seed"], rec["index"]), rec["record"])
        elif rec["kind"] == "undefended":
            undefended = rec["result"]
    return samples, undefended


def read_log(
    path: Union[str, os.PathLike], config: dict, *, repair: bool = False
) -> Tuple[Samples, Optional[dict]]:
    """``({(seed, index): record}, undefended)`` of the log at ``path``, read only (e.g. the
    log of another rank, which may still be writing it).

    A missing or empty file, or one of another configuration without any sample, has nothing;
    an incomplete last line is ignored; a log of another configuration raises ``ValueError``, a
    damaged line before the end :class:`LogDamaged` (with ``repair``: it and what follows are
    ignored, the file is left as it is).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {}, None
    records, _ = _scan(path, raw, config, repair)
    return ({}, None) if records is None else _collect(records)


class RunLog:
    """Append-only JSONL log: a config line, then sample (and undefended-check) lines.

    Args:
        path: the log file (None: keep records in memory only).
        config: the evaluation's configuration; an existing log must have been written by it.
        repair: drop a damaged line and everything after it instead of refusing the log.
    """

    def __init__(
        self, path: Optional[Union[str, os.PathLike]], config: dict, *, repair: bool = False
    ) -> None:
        self.path = None if path is None else os.fspath(path)
        self.config = config
        self.repair = bool(repair)
        self.samples: Dict[Tuple[int, int], dict] = {}
        self.undefended: Optional[dict] = None
        self._file = None
        self._lock: Optional[FileLock] = None
        if self.path is None:
            return
        parent, name = os.path.split(self.path)
        if os.path.isdir(self.path):
            raise IsADirectoryError(f"{self.path} is a folder, not a log file")
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._lock = FileLock(os.path.join(parent, f".{name}.lock"), name=self.path).acquire()
        try:
            if not (os.path.exists(self.path) and self._load()):
                self._file = open(self.path, "w")
                self._write({"kind": "config", "format": LOG_FORMAT, "config": config})
            if self._file is None:
                self._file = open(self.path, "a")
        except BaseException:
            self.close()
            raise

    def _load(self) -> bool:
        """Read an existing log; False when it should be (re)started from scratch."""
        with open(self.path, "rb") as f:
            raw = f.read()
        records, end = _scan(self.path, raw, self.config, self.repair)
        if records is None:
            return False
        if end < len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(end)
        self.samples, self.undefended = _collect(records)
        return True

    def merge(self, path: Union[str, os.PathLike]) -> None:
        """Also count the finished samples of another log of this configuration as done (read
        only: that file is never changed; see :func:`read_log`)."""
        samples, undefended = read_log(path, self.config, repair=self.repair)
        for key, record in samples.items():
            self.samples.setdefault(key, record)
        if self.undefended is None:
            self.undefended = undefended

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
        if self._lock is not None:
            self._lock.release()
            self._lock = None
