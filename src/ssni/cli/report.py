"""Command ``ssni report``: merge evaluate runs into one comparison table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List

from ..errors import UsageError
from .common import emit, setup_logging
from .outdir import locks_out


@locks_out
def cmd_report(args) -> int:
    from ..eval import reports

    setup_logging(args)
    dirs = [Path(d) for d in args.dirs]
    for d in dirs:
        path = d / reports.REPORT_JSON if d.is_dir() else d
        if not path.is_file():
            raise UsageError(f"{d}: no {reports.REPORT_JSON} (not an `ssni evaluate` output)")
    try:
        summary = reports.merge_reports(dirs)
    except (ValueError, json.JSONDecodeError) as err:
        raise UsageError(str(err).splitlines()[0]) from None
    if args.out:
        rows = []
        for d in dirs:
            rows += reports.read_report(d)["rows"]
        reports.write_report(args.out, _dedupe(rows), title="Comparison")
    emit(reports.markdown_table(summary))
    return 0


def _dedupe(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    seen, out = set(), []
    for r in rows:
        key = json.dumps([r.get("name"), r.get("seed"), r.get("config")], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def register(subparsers) -> None:
    """Add the command to ``ssni``'s subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "report",
        help="merge evaluate runs into one comparison table (mean +- std over seeds)",
        description="Merge the report.json of several `ssni evaluate` output directories.",
        epilog="example: ssni report runs/a runs/b --out runs/table",
        formatter_class=fmt,
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="evaluate output directories")
    p.add_argument("--out", metavar="DIR", help="also write the merged report files here")
    p.add_argument("--quiet", dest="sub_quiet", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_report)
