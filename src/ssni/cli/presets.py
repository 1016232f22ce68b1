"""Command ``ssni presets``: list the configuration presets, show one, or list every key."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from .common import emit


def cmd_presets(args) -> int:
    from .config import _read_preset, find_preset, list_presets, load_config, to_toml

    if args.keys:
        from .config import RunConfig, key_type

        defaults = RunConfig().to_dict()
        width = max(len(k) for k in defaults)
        emit("\n".join(f"{k:<{width}}  {key_type(k):<11}  {defaults[k]!r}" for k in defaults))
        return 0
    if args.show:
        find_preset(args.show)
        emit(to_toml(load_config(args.show)))
        return 0
    presets = list_presets()
    if not presets:
        raise UsageError("no presets found (looked in $SSNI_CONFIG_DIR, ./configs, the package)")
    width = max(len(n) for n in presets)
    lines = []
    for name, entry in presets.items():
        try:
            desc = str(_read_preset(entry).get("description", "")).splitlines()[0:1]
        except UsageError:
            desc = ["(unreadable preset)"]
        lines.append(f"{name:<{width}}  {desc[0] if desc else ''}")
    emit("\n".join(lines))
    return 0


def register(subparsers) -> None:
    """Add the command to ``ssni``'s subparsers."""
    p = subparsers.add_parser(
        "presets",
        help="list the configuration presets (one per row of the paper's tables)",
        description="List presets: those in $SSNI_CONFIG_DIR, ./configs and the package.",
    )
    p.add_argument("--show", metavar="NAME", help="print one preset's resolved configuration")
    p.add_argument("--keys", action="store_true", help="list every key with its type and default")
    p.add_argument("--quiet", dest="sub_quiet", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_presets)
