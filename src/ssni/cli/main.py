"""Command-line interface: ``ssni <command> ...``. The only module that reads configuration."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from ..errors import UsageError
from ..io.lock import LockError
from .distributed import launched

__all__ = ["main", "build_parser", "UsageError"]

# Each command module exposes ``register(subparsers)``; the parser it adds sets ``func(args)``.
COMMAND_MODULES = [
    "ssni.cli.train",
    "ssni.cli.purify_grid",
    "ssni.cli.demo",
    "ssni.cli.evaluate",
    "ssni.cli.presets",
    "ssni.cli.calibrate",
    "ssni.cli.analyze_t",
    "ssni.cli.report",
    "ssni.cli.learn",
    "ssni.cli.study",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssni",
        description="Diffusion-based adversarial purification with SSNI noise levels.",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if launched() and not getattr(args, "torchrun", False):
            raise UsageError(
                "this command runs as one process; only evaluate and study run start under "
                "torchrun"
            )
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"ssni {args.command}: error: {err}", file=sys.stderr)
        return 2
    except LockError as err:  # another run holds the results folder
        print(f"ssni {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - top-level report, exit code 1
        logging.getLogger("ssni").debug("failure", exc_info=True)
        print(f"ssni {args.command}: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
