"""What the commands share: configuration arguments, loading, output, crafting attacks.

Every command reads one flat configuration (see :mod:`ssni.cli.config`): a preset (``--preset NAME``
or a path to a ``.toml`` file) plus ``--set key=value`` overrides. Results go to ``--out DIR``
with the resolved configuration beside them (``config.toml``). Exit codes: 0 success, 2 bad
usage or configuration (one-line message naming the key), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch

__all__ = [
    "EXAMPLE_PRESET",
    "quiet",
    "setup_logging",
    "show_progress",
    "add_config_args",
    "load_run_config",
    "refuse_conflicts",
    "write_config",
    "emit",
    "craft",
]

EXAMPLE_PRESET = "fmnist-diffpure-ssni-n-pgd-linf"


def quiet(args) -> bool:
    return bool(getattr(args, "quiet", False) or getattr(args, "sub_quiet", False))


def setup_logging(args) -> None:
    if getattr(args, "sub_quiet", False):
        logging.getLogger().setLevel(logging.WARNING)


def show_progress(args) -> bool:
    return not quiet(args) and sys.stderr.isatty()


def add_config_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument(
        "--preset",
        metavar="NAME|PATH",
        help="preset name (see `ssni presets`) or path to a TOML file; default: the defaults",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one configuration key (repeatable), e.g. --set n=16 --set eps=8/255",
    )
    p.add_argument("--out", required=out_required, metavar="DIR", help="output directory")
    p.add_argument("--quiet", dest="sub_quiet", action="store_true", help="no progress bars")


def load_run_config(args):
    from . import build
    from .config import load_config

    cfg = load_config(args.preset, args.overrides)
    implied = build.policy_overrides(cfg)
    if implied:
        refuse_conflicts(cfg, implied, args.overrides)
        cfg = cfg.replace(**implied)
    return cfg


def refuse_conflicts(cfg, implied: Dict[str, Any], overrides: List[str]) -> None:
    """``--set KEY=`` values that the policy file would silently replace: ConfigError."""
    from .config import ConfigError, parse_override

    explicit = {parse_override(o)[0] for o in overrides}
    for key in sorted(explicit & set(implied)):
        mine, theirs = getattr(cfg, key), implied[key]
        same = mine == theirs or (
            isinstance(mine, float) and abs(mine - float(theirs)) <= 1e-9 * max(1.0, abs(mine))
        )
        if not same:
            raise ConfigError(
                key,
                f"--set {key}={mine!r} conflicts with policy_file {cfg.policy_file} "
                f"({key} = {theirs!r}); drop one of them",
            )


def write_config(out: Path, cfg) -> None:
    from ..io.files import write_text_atomic
    from .config import to_toml

    write_text_atomic(
        out / "config.toml",
        "# resolved configuration of this run (loadable with --preset)\n" + to_toml(cfg),
    )


def emit(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def craft(setup, x, y, cfg, generator, bar) -> torch.Tensor:
    """Adversarial examples for ``x`` in batches (``setup`` from ``build.build_attack``)."""
    if setup is None:
        return x.clone()
    out = []
    for i in range(0, x.shape[0], cfg.batch_size):
        xb, yb = x[i : i + cfg.batch_size], y[i : i + cfg.batch_size]
        out.append(setup.attack(setup.target.gradient, xb, yb, generator))
        bar(xb.shape[0])
    return torch.cat(out)
