"""``ssni study``: the Fashion-MNIST study of SSNI against constant-t DiffPure, resumable.

``ssni study run --out runs/study`` runs every stage of the study in a fixed order, cheap and
decisive stages first; each stage appends finished samples to its own JSONL log, so killing and
restarting loses at most the chunk in progress. ``ssni study report --logs runs/study`` writes
``docs/RESULTS.md`` and its figures from the logs alone, marking each row complete, partial or
not yet run. ``ssni study pack`` compresses the logs into a folder of the repository, from which
``ssni study run --resume-from`` restarts.

Stages (directories under ``--out``):

* ``clean/t0.050`` ...: constant DiffPure (DDPM steps of 1/1000) on ``CLEAN_N`` clean test
  images, one log per level; the main-table ``t*`` is the smallest level of ``T_GRID`` whose clean
  accuracy is at least ``CLEAN_DROP`` below the classifier's on the same images;
* ``undefended/...``: the classifier alone under each attack of the study;
* ``calibrate/table``: clean and adversarial correctness of validation images over a grid of
  levels (resumable), from which ``calibrate/ssni-n`` and ``calibrate/ssni-l`` choose tau and b;
* ``rows/<row>/seed<s>``: ``ssni evaluate`` runs (``log.jsonl`` as in ``ssni evaluate``);
* ``adv-grid``: the per-sample optimal-t analysis (``analyze-t``) on adversarial images.

Every stage directory holds ``identity.json``: the code fingerprint of the modules that compute
its numbers (their syntax trees, without docstrings) and the commit. A stage whose fingerprint
changed is refused (random streams or algorithms may differ) unless ``--accept-code-change``.
``sessions.jsonl`` records wall time, samples done and network calls of every session.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import math
import os
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..errors import UsageError

log = logging.getLogger("ssni.study")

#: Levels of the clean-accuracy stage (t* candidates), in units of t (0.1 = 100 DDPM steps).
T_GRID: Tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
#: Clean test images for the t* choice.
CLEAN_N = 1000
#: The main table uses the smallest t* whose clean accuracy drops by at least this much.
CLEAN_DROP = 0.04
#: Test images of every robust row (the same images for every row).
ROBUST_N = 256
#: Test images of the per-sample optimal-t analysis.
ANALYZE_N = 512
SEEDS: Tuple[int, ...] = (121, 122, 123)
EPS_MAIN = 0.1
EPS_SMALL = 0.05
#: Validation images: clean statistics and calibration images (disjoint).
STATS_N = 1000
CALIB_N = 128
CALIB_RESOLUTION = 0.02
CALIB_BIASES: Tuple[float, ...] = (0.0, 0.02, 0.05)
CALIB_TAUS: Tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
#: Samples per chunk (fixes the random streams; the unit of resumption).
CLEAN_BATCH = 100
ROW_BATCH = 32

#: The paper's attack shape at a reduced budget (see docs/RESULTS.md).
BASE: Dict[str, Any] = {
    "dataset": "fashion-mnist",
    "split": "test",
    "n": ROBUST_N,
    "subset_seed": 0,
    "score_model": "fmnist-unet",
    "classifier": "fmnist-cnn",
    "purifier": "diffpure",
    "rule": "ddpm",
    "purify_steps": 0,
    "attack": "pgd",
    "norm": "linf",
    "eps": EPS_MAIN,
    "step_size": EPS_MAIN / 10,
    "iterations": 30,
    "gradient": "surrogate",
    "surrogate_steps": 10,
    "eot": 4,
    "votes": 1,
    "batch_size": ROW_BATCH,
    "levels": 20,
    "stats_split": "val",
    "stats_n": STATS_N,
}

# Modules whose code determines the numbers of each kind of stage (fingerprinted).
_CORE = [
    "core/diffusion.py",
    "core/sampling.py",
    "core/purifiers.py",
    "core/score.py",
    "core/validation.py",
    "nets/unet.py",
    "nets/cnn.py",
    "io/weights.py",
    "data/fashion_mnist.py",
    "data/splits.py",
    "eval/streams.py",
]
_ATTACK = _CORE + [
    "core/policies.py",
    "core/defense.py",
    "core/gdmp.py",
    "core/gns.py",
    "core/ssim.py",
    "attacks/*.py",
    "eval/protocol.py",
    "eval/checks.py",
    "eval/calibrate.py",
    "eval/analysis.py",
    "cli/build.py",
]
CODE_MODULES: Dict[str, List[str]] = {"clean": _CORE, "attack": _ATTACK}


class StudyError(UsageError):
    """A study problem (one line)."""


# ----------------------------------------------------------------------------- identity


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(getattr(body[0], "value", None), ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return tree


def code_fingerprint(kind: str) -> str:
    """SHA-256 over the syntax trees (docstrings and comments dropped) of the modules that
    compute a ``kind`` stage's numbers: formatting and documentation changes keep it."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pattern in CODE_MODULES[kind]:
        for path in sorted(root.glob(pattern)):
            tree = _strip_docstrings(ast.parse(path.read_text(encoding="utf-8")))
            h.update(path.relative_to(root).as_posix().encode())
            h.update(ast.dump(tree, annotate_fields=False).encode())
    return h.hexdigest()[:16]


def code_commit() -> str:
    """The commit of the source checkout holding the package (``-dirty`` if modified)."""
    from .build import repo_root

    root = repo_root()
    if root is None:
        return "unknown"
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "src"],
            cwd=root, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def check_identity(stage_dir: Path, kind: str, accept_change: bool) -> Dict[str, Any]:
    """Write or check ``stage_dir/identity.json``; StudyError if the code changed."""
    path = stage_dir / "identity.json"
    now = {"code": code_fingerprint(kind), "commit": code_commit(), "kind": kind}
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("code") != now["code"]:
            if not accept_change:
                raise StudyError(
                    f"{stage_dir}: written by code {old.get('code')} (commit {old.get('commit')}),"
                    f" this code is {now['code']} (commit {now['commit']}); results would mix "
                    "code versions: use another --out, or --accept-code-change"
                )
            old.setdefault("history", []).append({**now, "accepted": time.time()})
            old["code"] = now["code"]
            _write_json(path, old)
        return old
    stage_dir.mkdir(parents=True, exist_ok=True)
    _write_json(path, now)
    return now


def _write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- accounting


class _CallCounter:
    """Counts images through the study's score network (a global forward hook on the UNet
    that :class:`~ssni.EpsilonNetwork` calls; the classifier is not counted)."""

    def __init__(self) -> None:
        self.images = 0
        self.calls = 0

    def __call__(self, module, inputs, output) -> None:
        from ..nets.unet import UNet

        if isinstance(module, UNet) and inputs and torch.is_tensor(inputs[0]):
            self.images += int(inputs[0].shape[0])
            self.calls += 1


@contextmanager
def accounted(out: Path, stage: str, done: callable) -> Iterator[None]:
    """Append one line to ``out/sessions.jsonl``: wall seconds, samples done before/after and
    images through the score network during the block (``done()`` counts finished samples)."""
    counter = _CallCounter()
    handle = torch.nn.modules.module.register_module_forward_hook(counter)
    before = done()
    start = time.time()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        handle.remove()
        rec = {
            "stage": stage,
            "start": start,
            "seconds": time.perf_counter() - t0,
            "samples_before": before,
            "samples_after": done(),
            "net_images": counter.images,
            "net_calls": counter.calls,
            "commit": code_commit(),
            "threads": torch.get_num_threads(),
        }
        with open(out / "sessions.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- configuration


def base_config(**changes: Any):
    """The study's RunConfig with ``changes``."""
    from .config import RunConfig

    return RunConfig().replace(**{**BASE, **changes})


def level_name(t: float) -> str:
    return f"t{t:.3f}"


# ----------------------------------------------------------------------------- clean stage


def run_clean(out: Path, levels: Sequence[float], *, seed: int, accept_change: bool) -> None:
    """Clean accuracy of constant DiffPure at each of ``levels`` on the first ``CLEAN_N`` test
    images, chunk-major (all levels of one chunk before the next), one log per level."""
    from ..eval.log import RunLog, fingerprint_data, fingerprint_module
    from ..eval.streams import keyed_generator
    from . import build

    cfg = base_config(n=CLEAN_N)
    model = build.build_score_model(cfg)
    classifier = build.build_classifier(cfg)
    purifier = build.build_purifier(cfg, model)
    x, y = build.eval_images(cfg)
    n = x.shape[0]
    logs: Dict[float, RunLog] = {}
    paths: Dict[float, Path] = {}
    for t in levels:
        d = out / "clean" / level_name(t)
        check_identity(d, "clean", accept_change)
        paths[t] = d / "log.jsonl"
        config = {
            "stage": "clean",
            "t": float(t),
            "purifier": repr(purifier),
            "score_model": fingerprint_module(model),
            "classifier": fingerprint_module(classifier),
            "data": {"n": n, "sha256": fingerprint_data(x, y), "split": "test", "subset_seed": 0},
            "seed": int(seed),
            "batch_size": CLEAN_BATCH,
        }
        logs[t] = RunLog(paths[t], config)

    def done() -> int:
        return sum(len(lg.samples) for lg in logs.values())

    try:
        with accounted(out, "clean:" + ",".join(level_name(t) for t in levels), done):
            for start in range(0, n, CLEAN_BATCH):
                idx = list(range(start, min(start + CLEAN_BATCH, n)))
                xb, yb = x[idx[0] : idx[-1] + 1], y[idx[0] : idx[-1] + 1]
                plain = None
                for t in levels:
                    lg = logs[t]
                    if all((seed, i) in lg.samples for i in idx):
                        continue
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        if plain is None:
                            plain = classifier(xb).argmax(1)
                        gen = keyed_generator(x.device, seed, start, round(1000 * t))
                        pred = classifier(purifier(xb, float(t), generator=gen)).argmax(1)
                    for j, i in enumerate(idx):
                        lg.add_sample(
                            {
                                "seed": int(seed),
                                "index": i,
                                "label": int(yb[j]),
                                "pred": int(pred[j]),
                                "correct": bool(pred[j] == yb[j]),
                                "plain_pred": int(plain[j]),
                                "plain_correct": bool(plain[j] == yb[j]),
                            }
                        )
                    log.info(
                        "clean t=%.3f: %d/%d images (%.0f s for this chunk)",
                        t, len(lg.samples), n, time.perf_counter() - t0,
                    )
    finally:
        for lg in logs.values():
            lg.close()


def read_log(path: Path) -> Tuple[Optional[dict], List[dict]]:
    """``(config, sample records)`` of a JSONL log, ``.jsonl`` or ``.jsonl.gz`` (None, [] if
    absent); a last line cut short is ignored."""
    import gzip

    for p in (path, path.with_name(path.name + ".gz")):
        if p.is_file():
            opener = gzip.open if p.suffix == ".gz" else open
            with opener(p, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
            break
    else:
        return None, []
    config, records, seen = None, [], set()
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "config":
            config = rec.get("config")
        elif rec.get("kind") == "sample":
            key = (rec["seed"], rec["index"])
            if key not in seen:
                seen.add(key)
                records.append(rec["record"])
    return config, records


def clean_levels(root: Path) -> Dict[float, List[dict]]:
    """Records of every clean-stage level found under ``root``."""
    out = {}
    for t in T_GRID:
        _, recs = read_log(root / "clean" / level_name(t) / "log.jsonl")
        if recs:
            out[t] = recs
    return out


@dataclass
class TStarChoice:
    """The main-table t* and the clean accuracies that chose it."""

    t_star: Optional[float]
    rows: List[Dict[str, Any]] = field(default_factory=list)
    reason: str = ""


def choose_t_star(root: Path) -> TStarChoice:
    """Smallest level of ``T_GRID`` whose clean accuracy on all ``CLEAN_N`` images is at least
    ``CLEAN_DROP`` below the classifier's; None while a smaller level is incomplete."""
    levels = clean_levels(root)
    rows = []
    chosen, reason = None, ""
    for t in T_GRID:
        recs = levels.get(t, [])
        if not recs:
            rows.append({"t": t, "n": 0})
            if chosen is None and not reason:
                reason = f"t = {t:g} not run yet"
            continue
        acc = sum(r["correct"] for r in recs) / len(recs)
        plain = sum(r["plain_correct"] for r in recs) / len(recs)
        rows.append({"t": t, "n": len(recs), "acc": acc, "plain": plain, "drop": plain - acc})
        if chosen is not None or reason:
            continue
        if len(recs) < CLEAN_N:
            reason = f"t = {t:g} has {len(recs)}/{CLEAN_N} images"
        elif plain - acc >= CLEAN_DROP - 1e-12:
            chosen = t
    if chosen is None and not reason:
        reason = f"no level of {list(T_GRID)} loses {100 * CLEAN_DROP:g} points"
    return TStarChoice(chosen, rows, reason)


# ----------------------------------------------------------------------------- runner


def cmd_run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.resume_from:
        unpack(Path(args.resume_from), out)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = study_plan(out)
    if args.list:
        for stage in plan:
            print(f"{stage.name:<48} {stage.status(out)}")
        return 0
    only = set(args.only or [])
    for stage in plan:
        if only and not any(stage.name.startswith(o) for o in only):
            continue
        state = stage.status(out)
        if state == "complete":
            continue
        blocked = stage.blocked(out)
        if blocked:
            log.info("%s: waiting (%s)", stage.name, blocked)
            continue
        log.info("%s: starting (%s)", stage.name, state)
        stage.run(out, accept_change=args.accept_code_change)
        # a stage may decide t*: rebuild the plan so later stages see it
        plan = study_plan(out)
    return 0


@dataclass
class Stage:
    """One resumable unit of the study."""

    name: str
    kind: str
    spec: Dict[str, Any]

    def status(self, out: Path) -> str:
        return stage_status(self, out)

    def blocked(self, out: Path) -> str:
        return stage_blocked(self, out)

    def run(self, out: Path, *, accept_change: bool) -> None:
        RUNNERS[self.kind](self, out, accept_change)


def stage_status(stage: Stage, out: Path) -> str:
    if stage.kind == "clean":
        done = [len(read_log(out / "clean" / level_name(t) / "log.jsonl")[1])
                for t in stage.spec["levels"]]
        total = CLEAN_N * len(done)
        if sum(done) >= total:
            return "complete"
        return f"partial {sum(done)}/{total}" if sum(done) else "not run"
    return "not run"


def stage_blocked(stage: Stage, out: Path) -> str:
    return ""


def _run_clean_stage(stage: Stage, out: Path, accept_change: bool) -> None:
    run_clean(out, stage.spec["levels"], seed=SEEDS[0], accept_change=accept_change)


RUNNERS = {"clean": _run_clean_stage}


def study_plan(out: Path) -> List[Stage]:
    """The ordered stages (cheap and decisive first)."""
    plan = [Stage("clean-decisive", "clean", {"levels": [0.05, 0.1, 0.2]})]
    plan.append(Stage("clean-curve", "clean", {"levels": [0.3, 0.5]}))
    return plan


# ----------------------------------------------------------------------------- pack / unpack


def unpack(src: Path, out: Path) -> None:
    """Copy a packed study (``.gz`` logs) into ``out`` where ``out`` lacks the files."""
    import gzip
    import shutil

    for path in sorted(src.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(src)
        if path.suffix == ".gz":
            dest = out / rel.with_suffix("")
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                with gzip.open(path, "rb") as fi, open(dest, "wb") as fo:
                    shutil.copyfileobj(fi, fo)
        else:
            dest = out / rel
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)


PACKED = ("log.jsonl", "sessions.jsonl")
KEPT = ("identity.json", "config.toml", "policy.json", "calibration.json", "report.json")


def pack(out: Path, dest: Path) -> List[Path]:
    """Copy the study's logs (gzip) and small result files from ``out`` into ``dest``."""
    import gzip
    import shutil

    written = []
    for path in sorted(out.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(out)
        if path.name in PACKED:
            target = dest / rel.with_name(rel.name + ".gz")
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "rb") as fi, gzip.GzipFile(
                target, "wb", compresslevel=9, mtime=0
            ) as fo:
                shutil.copyfileobj(fi, fo)
            written.append(target)
        elif path.name in KEPT:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            written.append(target)
    return written


def cmd_pack(args) -> int:
    written = pack(Path(args.out), Path(args.to))
    print(f"packed {len(written)} files into {args.to}")
    return 0


def cmd_report(args) -> int:
    from .study_report import write_results

    paths = write_results(Path(args.logs), Path(args.docs), Path(args.figures))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def register(subparsers) -> None:
    """Add ``ssni study`` to the command line."""
    p = subparsers.add_parser(
        "study",
        help="the Fashion-MNIST SSNI study: run it resumably, write docs/RESULTS.md from its logs",
        description=__doc__.split("\n\n")[1],
    )
    sub = p.add_subparsers(dest="study_command", metavar="STEP")
    r = sub.add_parser("run", help="run (or resume) every stage in order")
    r.add_argument("--out", default="runs/study", metavar="DIR", help="study folder")
    r.add_argument("--only", action="append", metavar="STAGE", help="stage name prefix")
    r.add_argument("--list", action="store_true", help="list the stages and their state")
    r.add_argument("--resume-from", metavar="DIR", help="a packed study to start from")
    r.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    r.add_argument(
        "--accept-code-change",
        action="store_true",
        help="resume stages written by other code (recorded in identity.json)",
    )
    r.set_defaults(func=cmd_run)
    w = sub.add_parser("report", help="write docs/RESULTS.md and figures from the logs alone")
    w.add_argument("--logs", default="docs/results/study", metavar="DIR")
    w.add_argument("--docs", default="docs/RESULTS.md", metavar="FILE")
    w.add_argument("--figures", default="docs/results/figures", metavar="DIR")
    w.set_defaults(func=cmd_report)
    k = sub.add_parser("pack", help="compress the logs into a folder of the repository")
    k.add_argument("--out", default="runs/study", metavar="DIR", help="study folder")
    k.add_argument("--to", default="docs/results/study", metavar="DIR")
    k.set_defaults(func=cmd_pack)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
