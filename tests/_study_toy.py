"""The study at a toy size, for tests: ``shrink()`` in this process, or as a torchrun script.

``python tests/_study_toy.py [--wide] ARGS...`` (e.g. under ``torchrun``) shrinks the study, then
runs ``ssni ARGS...``; monkeypatching cannot reach the processes torchrun starts, so they apply
the same sizes themselves. ``--wide`` gives every stage several chunks (``WIDE``), so that two
ranks share each stage's work.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

#: A few images, levels of 1-3 steps, one attack iteration.
TINY = {
    "T_GRID": (0.001, 0.002, 0.003, 0.004, 0.005),
    "CLEAN_N": 4,
    "CLEAN_BATCH": 4,
    "ROBUST_N": 2,
    "ANALYZE_N": 2,
    "STATS_N": 4,
    "CALIB_N": 2,
    "ROW_BATCH": 2,
    "CLEAN_DROP": -1.0,  # the first complete level is t*
    "CALIB_RESOLUTION": 0.001,
    "CALIB_BIASES": (0.0, 0.001),
    "CALIB_ATTACK": (1, 1),
}
#: Two chunks or more in every stage (rows: ``batch_size`` 2 of the row configuration).
WIDE = {**TINY, "CLEAN_BATCH": 2, "ROBUST_N": 4, "ANALYZE_N": 4, "CALIB_N": 4}


def shrink(set_attr: Callable[[Any, str, Any], None] = setattr, sizes=None) -> None:
    """Apply ``sizes`` (default ``TINY``) to :mod:`ssni.cli.study` with ``set_attr`` (e.g.
    ``monkeypatch.setattr``); clean stages get toy levels."""
    from ssni.cli import study as st

    sizes = sizes or TINY
    for name, value in sizes.items():
        set_attr(st, name, value)
    base = {"iterations": 1, "eot": 1, "surrogate_steps": 1, "levels": 2}
    if sizes is WIDE:
        base["batch_size"] = WIDE["ROW_BATCH"]
    set_attr(st, "BASE", {**st.BASE, **base})
    real_plan = st.study_plan

    def plan():
        stages = real_plan()
        for s in stages:
            if s.kind == "clean":
                s.spec["levels"] = [0.001, 0.002] if s.name == "clean-decisive" else [0.003]
        return stages

    set_attr(st, "study_plan", plan)


if __name__ == "__main__":
    from ssni.cli.main import main

    argv = sys.argv[1:]
    wide = bool(argv) and argv[0] == "--wide"
    shrink(sizes=WIDE if wide else TINY)
    sys.exit(main(argv[1:] if wide else argv))
