"""The one progress display of the command line (library code only takes callbacks).

On a terminal: a tqdm bar with ETA. Otherwise (logs, pipes): an INFO line of the ``ssni.cli``
logger at the start and then at most every ``every`` seconds, with the time spent and left.
Nothing with ``--quiet`` or when there is nothing to do.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Dict, Optional

__all__ = ["Progress"]

log = logging.getLogger("ssni.cli")


class Progress:
    """``progress(k)`` after ``k`` more items; ``progress.step(info)`` for trainer callbacks
    (``info``: ``step`` (1-based, may start late when resuming), ``loss``, ``lr``, ``epoch``)."""

    def __init__(
        self, total: int, desc: str, quiet: bool, *, unit: str = "img", every: float = 30.0
    ) -> None:
        self.total, self.desc, self.unit, self.every = int(total), desc, unit, every
        self.done = 0
        self.first: Optional[int] = None
        self.start = self.last = time.perf_counter()
        self.bar = None
        active = not quiet and self.total > 0
        self.lines = active and not sys.stderr.isatty()
        if active and not self.lines:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
        elif self.lines:
            log.info("%s: 0/%d", desc, self.total)

    def __call__(self, k: int = 1, **postfix: Any) -> None:
        """``k`` more items done; ``postfix`` values are shown beside the bar or in the line."""
        if self.first is None:
            self.first = self.done
            self.start = time.perf_counter()
        self.done += int(k)
        if self.bar is not None:
            self.bar.update(int(k))
            if postfix:
                self.bar.set_postfix(**postfix)
        elif self.lines and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            spent = self.last - self.start
            left = spent / max(self.done - self.first, 1) * max(self.total - self.done, 0)
            extra = "".join(f" {key} {value}" for key, value in postfix.items())
            log.info("%s: %d/%d%s (%.0f s, about %.0f s left)", self.desc, self.done, self.total,
                     extra, spent, left)

    def step(self, info: Dict[str, Any]) -> None:
        """Trainer callback: jumps to ``info['step'] - 1`` on the first call (resumed runs)."""
        if self.first is None and info["step"] > 1:
            self.done = info["step"] - 1
            if self.bar is not None:
                self.bar.update(self.done)
        postfix = {"loss": f"{info['loss']:.4f}"}
        if self.bar is None:
            postfix["lr"] = f"{info['lr']:.2e}"
            if "epoch" in info:
                postfix = {"epoch": info["epoch"], **postfix}
        self(1, **postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
