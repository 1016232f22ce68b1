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

Under ``torchrun`` (``torchrun --nproc_per_node=N -m ssni study run --out DIR``) every rank walks
the same plan: rank 0 holds the folder lock, picks each next stage from the files and broadcasts
it. The chunks of a stage are dealt round robin to the ranks; rank ``r`` writes
``log.rank{r}.jsonl`` in the stage folder (``evaluate``'s scheme, which the row and undefended
stages use directly), and every reader merges the ``log*.jsonl`` of a folder. A chunk's
randomness is keyed by seed, chunk start and phase, never by rank, so each stage's records equal
a single process's, and any world size resumes from all logs. The calibration choice (cheap) runs
on rank 0 while the others wait; so a rank may wait for hours at a barrier, and the process group
is made with a 24-hour timeout (:data:`ssni.cli.distributed.TIMEOUT`). Only rank 0 writes shared
files (``identity.json``, ``sessions.jsonl``, policies, reports); its session lines add up the
network images and CPU seconds of all ranks. The study folder must be on a filesystem every rank
sees (later stages read what earlier ones wrote).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..core.policies import REWEIGHT
from ..errors import UsageError
from ..eval.distributed import agree, broadcast, gather, share
from .distributed import LOG_NAME, Job, log_name

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
#: The calibration attack (iterations, EOT) against constant t*, as `ssni calibrate`'s defaults.
CALIB_ATTACK: Tuple[int, int] = (10, 1)
#: Precision of the row attacks' gradient passes (``attack_autocast``): bf16 is faster on a CPU
#: with bf16 instructions (1.4-1.9x in the README's measurement), and its gradient agrees with
#: fp32 far more closely than two EOT estimates agree with each other
#: (``benchmarks/bench_autocast.py``); every prediction that counts (the attack's judge, clean
#: and adversarial accuracy) stays fp32.
ROW_AUTOCAST = "bf16"
#: Samples per chunk (fixes the random streams; the unit of resumption).
CLEAN_BATCH = 100
ROW_BATCH = 32

#: The paper's attack shape at a reduced budget (see docs/RESULTS.md).
BASE: Dict[str, Any] = {
    "dataset": "fashion-mnist",
    "split": "test",
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


@functools.cache
def code_fingerprint(kind: str) -> str:
    """SHA-256 over the syntax trees (docstrings and comments dropped) of the modules that
    compute a ``kind`` stage's numbers: formatting and documentation changes keep it. Read once
    per process, so files edited under a running study do not change its identity."""
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
    root = next(
        (p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file()), None
    )
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


def check_identity(
    stage_dir: Path,
    kind: str,
    accept_change: bool,
    verify: Optional[Callable[[], bool]] = None,
) -> Dict[str, Any]:
    """Write or check ``stage_dir/identity.json``.

    When the code fingerprint changed, the stage is extended only if ``accept_change`` is set or
    ``verify()`` (e.g. a replay of the first logged chunk with this code) returns True; either
    is recorded in the file's ``history``. Otherwise StudyError."""
    path = stage_dir / "identity.json"
    now = {"code": code_fingerprint(kind), "commit": code_commit(), "kind": kind,
           "device": device_kind(_DEVICE)}
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        old_device = old.get("device", "cpu")  # identities before --device: CPU runs
        if old.get("code") != now["code"] or old_device != now["device"]:
            what = "code" if old_device == now["device"] else "device"
            how = "accepted (--accept-code-change)" if accept_change else ""
            if not how and verify is not None:
                log.info("%s: %s changed; replaying the first logged chunk", stage_dir, what)
                if verify():
                    how = "verified: the first logged chunk replays identically"
            if not how:
                raise StudyError(
                    f"{stage_dir}: written by code {old.get('code')} (commit {old.get('commit')})"
                    f" on {old_device}, this is code {now['code']} (commit {now['commit']}) on "
                    f"{now['device']}; results would mix {what} versions: use another --out, or "
                    "--accept-code-change"
                )
            old.setdefault("first_code", old.get("code"))
            old.setdefault("first_device", old_device)
            old.setdefault("history", []).append({**now, "how": how, "time": time.time()})
            old["code"] = now["code"]
            old["device"] = now["device"]
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


HEARTBEAT_S = 60.0


@contextmanager
def accounted(
    out: Path, stage: str, done: Callable[[], int], group=None
) -> Iterator[None]:
    """Record a session of ``stage`` in ``out/sessions.jsonl``: wall and CPU seconds (all
    threads of the process), samples done before/now (``done()`` counts finished samples)
    and images through the score network.

    A line is appended every ``HEARTBEAT_S`` seconds and at the end, all with the same
    ``session`` id; readers keep the last line of each session, so a killed run loses at most
    one heartbeat of accounting.

    With ``group`` (the ranks of a torchrun job, which all enter this block together) rank 0
    alone writes; its heartbeats count its own network images and CPU seconds, its last line
    those of every rank (summed when the block ends without an exception) and ``ranks``."""
    from ..eval.distributed import rank_of, world_of

    lead = rank_of(group) == 0
    counter = _CallCounter()
    handle = torch.nn.modules.module.register_module_forward_hook(counter)
    before = done() if lead else 0
    start = time.time()
    t0 = time.perf_counter()
    c0 = time.process_time()
    session = f"{os.getpid()}-{start:.3f}"
    commit = code_commit() if lead else ""
    lock = threading.Lock()

    def write(final: bool, totals: Optional[Tuple[int, int, float]] = None) -> None:
        images, calls, cpu = totals or (
            counter.images, counter.calls, time.process_time() - c0
        )
        rec = {
            "stage": stage,
            "session": session,
            "start": start,
            "seconds": time.perf_counter() - t0,
            "cpu_seconds": cpu,
            "samples_before": before,
            "samples_after": done(),
            "net_images": images,
            "net_calls": calls,
            "commit": commit,
            "threads": torch.get_num_threads(),
            "final": final,
        }
        if group is not None:
            rec["ranks"] = world_of(group)
        with lock, open(out / "sessions.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")

    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                write(False)
            except Exception:  # noqa: BLE001 - accounting must never stop the study
                log.debug("heartbeat failed", exc_info=True)

    thread = threading.Thread(target=beat, daemon=True)
    if lead:
        thread.start()
    finished = False
    try:
        yield
        finished = True
    finally:
        stop.set()
        if lead:
            thread.join()
        handle.remove()
        totals = None
        if group is not None and finished:  # every rank is here: add up their counts
            mine = (counter.images, counter.calls, time.process_time() - c0)
            totals = tuple(sum(v) for v in zip(*gather(group, mine)))
        if lead:
            write(True, totals)


# ----------------------------------------------------------------------------- configuration


#: Device of this process's study run (``cpu``, ``cuda`` or ``cuda:N``), set by ``study run
#: --device``; under torchrun with ``cuda`` each rank uses ``cuda:LOCAL_RANK``.
_DEVICE = "cpu"


def device_kind(device: str) -> str:
    """``cpu``, ``cuda`` or ``mps``: the device family a stage's identity records (results of
    different families differ in the last bits, so one stage keeps to one family)."""
    return device.split(":")[0]


def base_config(**changes: Any):
    """The study's RunConfig (``ROBUST_N`` images, on the run's device) with ``changes``."""
    from .config import RunConfig

    return RunConfig().replace(**{"n": ROBUST_N, **BASE, "device": _DEVICE, **changes})


def level_name(t: float) -> str:
    return f"t{t:.3f}"


# ----------------------------------------------------------------------------- clean stage


def run_clean(
    out: Path,
    levels: Sequence[float],
    *,
    seed: int,
    accept_change: bool,
    job: Optional[Job] = None,
) -> None:
    """Clean accuracy of constant DiffPure at each of ``levels`` on the first ``CLEAN_N`` test
    images, chunk-major (all levels of one chunk before the next), one log per level.

    Under torchrun (``job``) the (chunk, level) pairs left are dealt round robin to the ranks,
    each writing its own log per level; the records are those of one process."""
    from ..eval.log import fingerprint_data, fingerprint_module
    from ..eval.streams import keyed_generator
    from . import build

    job = job or Job()
    group = job.group

    def setup():
        cfg = base_config(n=CLEAN_N)
        model = build.build_score_model(cfg)
        classifier = build.build_classifier(cfg)
        return model, classifier, build.build_purifier(cfg, model), *_test_images(cfg)

    model, classifier, purifier, x, y = agree(group, setup)
    n = x.shape[0]

    @torch.no_grad()
    def chunk(start: int, t: float) -> List[dict]:
        idx = list(range(start, min(start + CLEAN_BATCH, n)))
        xb, yb = x[idx[0] : idx[-1] + 1], y[idx[0] : idx[-1] + 1]
        plain = classifier(xb).argmax(1)
        gen = keyed_generator(x.device, seed, start, round(1000 * t))
        pred = classifier(purifier(xb, float(t), generator=gen)).argmax(1)
        return [
            {
                "seed": int(seed),
                "index": i,
                "label": int(yb[j]),
                "pred": int(pred[j]),
                "correct": bool(pred[j] == yb[j]),
                "plain_pred": int(plain[j]),
                "plain_correct": bool(plain[j] == yb[j]),
            }
            for j, i in enumerate(idx)
        ]

    def replay(t: float, path: Path) -> Callable[[], bool]:
        def verify() -> bool:
            logged = {r["index"]: r for r in read_log(path)[1]}
            first = [i for i in range(min(CLEAN_BATCH, n)) if i in logged]
            if len(first) < min(CLEAN_BATCH, n):
                return not logged  # nothing logged: nothing to mix
            return all(logged[r["index"]] == r for r in chunk(0, t))

        return verify

    dirs = {t: out / "clean" / level_name(t) for t in levels}
    for t, d in dirs.items():  # rank 0 checks (and may replay a chunk), the others wait
        _on_lead(job, check_identity, d, "clean", accept_change, verify=replay(t, d / LOG_NAME))
    configs = {
        t: {
            "stage": "clean",
            "t": float(t),
            "purifier": repr(purifier),
            "score_model": fingerprint_module(model),
            "classifier": fingerprint_module(classifier),
            "data": {"n": n, "sha256": fingerprint_data(x, y), "split": "test", "subset_seed": 0},
            "seed": int(seed),
            "batch_size": CLEAN_BATCH,
        }
        for t in levels
    }
    _same_everywhere(group, configs)
    logs = _open_logs(job, {t: (dirs[t], configs[t]) for t in levels})
    try:
        done = {t: set().union(*gather(group, set(lg.samples))) for t, lg in logs.items()}
        todo = [
            (start, t)
            for start in range(0, n, CLEAN_BATCH)
            for t in levels
            if not all((seed, i) in done[t] for i in range(start, min(start + CLEAN_BATCH, n)))
        ]
        mine = share(todo, job.rank, job.world_size)

        def count(t: float) -> int:
            return len(logs[t].samples) if group is None else _log_count(dirs[t] / LOG_NAME)

        def run_mine() -> None:
            for start, t in mine:
                t0 = time.perf_counter()
                for rec in chunk(start, t):
                    logs[t].add_sample(rec)
                log.info(
                    "clean t=%.3f: %d/%d images (%.0f s for this chunk)",
                    t, count(t), n, time.perf_counter() - t0,
                )

        stage = "clean:" + ",".join(level_name(t) for t in levels)
        with accounted(out, stage, lambda: sum(map(count, levels)), group):
            agree(group, run_mine)
    finally:
        for lg in logs.values():
            lg.close()


def _on_lead(job: Job, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on rank 0 while the other ranks wait; if it raises, every rank
    raises. Returns rank 0's value there, None on the others."""
    return agree(job.group, lambda: fn(*args, **kwargs) if job.rank == 0 else None)


def _same_everywhere(group, config: Any) -> None:
    """Refuse (on every rank) when the ranks computed different stage configurations (other
    data or weights on one machine)."""
    if group is None:
        return
    mine = json.dumps(config, sort_keys=True)
    for rank, theirs in enumerate(gather(group, mine)):
        if theirs != mine:
            raise StudyError(f"rank {rank} has another stage configuration than this rank")


def _open_logs(job: Job, where: Dict[Any, Tuple[Path, dict]]) -> Dict[Any, Any]:
    """This rank's log (``log.jsonl``, or ``log.rank{r}.jsonl`` under torchrun) in each stage
    folder of ``where`` (``key -> (folder, config)``), holding the finished samples of the
    folder's other logs too (read only); opened on every rank or on none."""
    from ..eval.log import RunLog

    opened: Dict[Any, RunLog] = {}

    def open_all() -> None:
        for key, (folder, config) in where.items():
            own = folder / log_name(job)
            lg = opened[key] = RunLog(own, config)
            for path in sorted(folder.glob("log*.jsonl")):
                if path.name != own.name:
                    lg.merge(path)

    try:
        agree(job.group, open_all)
    except BaseException:
        for lg in opened.values():
            lg.close()
        raise
    return opened


_RANK_LOG = re.compile(r"log\.rank(\d+)\.jsonl")


def is_log(name: str) -> bool:
    """Whether ``name`` is a stage log: ``log.jsonl`` or a torchrun rank's ``log.rank{r}.jsonl``."""
    return name == LOG_NAME or _RANK_LOG.fullmatch(name) is not None


def _log_files(path: Path) -> List[Path]:
    """The files of the log ``path`` and, for a stage's ``log.jsonl``, of the rank logs beside
    it (each as ``.jsonl`` or else ``.jsonl.gz``), in rank order after ``path``."""
    names = [path.name]
    if path.name == LOG_NAME and path.parent.is_dir():
        ranks = {
            int(m.group(1)): m.group(0)
            for p in path.parent.iterdir()
            if (m := _RANK_LOG.fullmatch(p.name[:-3] if p.name.endswith(".gz") else p.name))
        }
        names += [ranks[r] for r in sorted(ranks)]
    found = []
    for name in names:
        for p in (path.with_name(name), path.with_name(name + ".gz")):
            if p.is_file():
                found.append(p)
                break
    return found


def read_log(path: Path) -> Tuple[Optional[dict], List[dict]]:
    """``(config, sample records)`` of a JSONL log, ``.jsonl`` or ``.jsonl.gz`` (None, [] if
    absent); a last line cut short is ignored.

    For a stage's ``log.jsonl`` the logs of torchrun ranks beside it (``log.rank{r}.jsonl``)
    are read too: one record per (seed, index), in (seed, index) order, which is the order of
    a single process's log; the configuration is the first log's."""
    import gzip

    files = _log_files(path)
    config, records, seen = None, [], set()
    for p in files:
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("kind") == "config":
                config = rec.get("config") if config is None else config
            elif rec.get("kind") == "sample":
                key = (rec["seed"], rec["index"])
                if key not in seen:
                    seen.add(key)
                    records.append((key, rec["record"]))
    if len(files) > 1:
        records.sort(key=lambda kr: kr[0])
    return config, [r for _, r in records]


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


# ----------------------------------------------------------------------------- stages


@dataclass
class Stage:
    """One resumable unit of the study: ``kind`` picks its runner, ``spec`` its settings."""

    name: str
    kind: str
    spec: Dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        """Folder of the stage under the study folder."""
        return self.spec.get("dir", self.name)


def row_name(purifier: str, policy: str, attack: str, eps: float) -> str:
    return f"{purifier}-{policy}-{attack}-eps{eps:.3f}"


def row_stage(purifier: str, policy: str, attack: str, eps: float, seed: int) -> Stage:
    name = row_name(purifier, policy, attack, eps)
    spec = {"purifier": purifier, "policy": policy, "attack": attack, "eps": eps, "seed": seed}
    return Stage(f"{name}/seed{seed}", "row", {**spec, "dir": f"rows/{name}/seed{seed}"})


POLICIES = ("constant", "ssni-n", "ssni-l")


def study_plan() -> List[Stage]:
    """The ordered stages: cheap and decisive first, then one seed of every main row so that a
    paired comparison exists early, then the other seeds of the main rows, then the other
    attacks, eps and purifiers on one seed, cheapest first (the smaller eps and the
    policy-aware attack take their gradients through the 10-step surrogate like a main row;
    AutoAttack-rand judges and BPDA differentiates the real 200-step purification at every
    iteration: 30 x 4 x 200 forward network calls per image for BPDA), then the other seeds of
    the smaller eps, GDMP and BPDA."""
    plan = [Stage("clean-decisive", "clean", {"levels": [0.05, 0.1, 0.2]})]
    plan += [
        Stage(f"undefended-{a}-eps{e:.3f}", "undefended",
              {"attack": a, "eps": e, "dir": f"undefended/{a}-eps{e:.3f}"})
        for a, e in (("pgd", EPS_MAIN), ("pgd", EPS_SMALL), ("autoattack", EPS_MAIN))
    ]
    plan.append(Stage("calibrate-table", "calib-table", {"dir": "calibrate/table"}))
    plan.append(Stage("calibrate-select", "calib-select", {"dir": "calibrate"}))
    main = [("diffpure", p, "pgd", EPS_MAIN) for p in POLICIES]
    plan += [row_stage(*r, SEEDS[0]) for r in main]
    plan += [row_stage(*r, s) for s in SEEDS[1:] for r in main]
    small = [("diffpure", p, "pgd", EPS_SMALL) for p in POLICIES]
    aware = [("diffpure", p, "aware", EPS_MAIN) for p in ("ssni-n", "ssni-l")]
    gdmp = [("gdmp", p, "pgd", EPS_MAIN) for p in POLICIES]
    gns = [("gns", p, "pgd", EPS_MAIN) for p in POLICIES]
    auto = [("diffpure", p, "autoattack", EPS_MAIN) for p in POLICIES]
    bpda = [("diffpure", p, "bpda", EPS_MAIN) for p in POLICIES]
    plan += [row_stage(*r, SEEDS[0]) for r in small + aware + gdmp + gns]
    plan.append(Stage("clean-curve", "clean", {"levels": [0.3, 0.5]}))
    plan.append(Stage("analyze-t", "adv-grid", {"dir": "analyze-t"}))
    plan += [row_stage(*r, SEEDS[0]) for r in auto + bpda]
    plan += [row_stage(*r, s) for s in SEEDS[1:] for r in small + gdmp + bpda]
    return plan


# ----------------------------------------------------------------------------- state


def _log_count(path: Path) -> int:
    return len(read_log(path)[1])


def stage_status(stage: Stage, out: Path) -> Tuple[int, int]:
    """``(samples done, samples needed)`` of a stage."""
    if stage.kind == "clean":
        done = sum(_log_count(out / "clean" / level_name(t) / "log.jsonl")
                   for t in stage.spec["levels"])
        return done, CLEAN_N * len(stage.spec["levels"])
    if stage.kind == "calib-select":
        got = sum((out / "calibrate" / p / "policy.json").is_file() for p in ("ssni-n", "ssni-l"))
        return got, 2
    need = {"calib-table": CALIB_N, "adv-grid": ANALYZE_N}.get(stage.kind, ROBUST_N)
    return _log_count(out / stage.path / "log.jsonl"), need


def describe(done: int, need: int) -> str:
    if done >= need:
        return "complete"
    return f"partial {done}/{need}" if done else "not run"


def stage_blocked(stage: Stage, out: Path) -> str:
    """Why a stage cannot run yet ("" if it can)."""
    if stage.kind in ("undefended", "clean"):
        return ""
    choice = choose_t_star(out)
    if choice.t_star is None:
        return "t* not decided: " + choice.reason
    if stage.kind == "calib-select" and _log_count(out / "calibrate/table/log.jsonl") < CALIB_N:
        return "calibration table incomplete"
    if stage.kind == "row" and stage.spec["policy"] != "constant":
        if not (out / "calibrate" / stage.spec["policy"] / "policy.json").is_file():
            return "calibration not done"
    if stage.kind == "adv-grid" and not (out / "calibrate" / "ssni-n" / "policy.json").is_file():
        return "calibration not done"
    return ""


# ----------------------------------------------------------------------------- runners


def _threat(eps: float):
    from .. import attacks

    return attacks.ThreatModel("Linf", float(eps))


def undefended_attack(kind: str, eps: float):
    """The study's attack on the classifier alone (deterministic: one gradient per step)."""
    from .. import attacks

    threat = _threat(eps)
    if kind == "autoattack":
        return attacks.autoattack_rand(threat, iterations=BASE["iterations"], eot=1)
    return attacks.PGD(threat, iterations=BASE["iterations"], step_size=eps / 10, eot=1)


def _identity(job: Job, stage_dir: Path, kind: str, accept_change: bool) -> None:
    """:func:`check_identity` on rank 0 (the only writer), its verdict on every rank."""
    _on_lead(job, check_identity, stage_dir, kind, accept_change)


def _run_undefended(stage: Stage, out: Path, accept_change: bool, job: Job) -> None:
    from ..eval.protocol import evaluate
    from . import build

    d = out / stage.path
    _identity(job, d, "attack", accept_change)

    def setup():
        cfg = base_config()
        return build.build_classifier(cfg), *_test_images(cfg)

    classifier, x, y = agree(job.group, setup)
    attack = undefended_attack(stage.spec["attack"], stage.spec["eps"])
    with accounted(out, stage.name, lambda: _log_count(d / LOG_NAME), job.group):
        # evaluate deals the chunks to the ranks itself (log.rank{r}.jsonl under torchrun)
        evaluate(classifier, attack, (x, y), seeds=[SEEDS[0]], batch_size=ROW_BATCH,
                 log_path=d / log_name(job), resume_from=sorted(d.glob("log*.jsonl")),
                 group=job.group, sanity_checks=False)


def row_config(stage: Stage, out: Path):
    """The RunConfig of a row stage (t* from the clean stage, policy from calibration)."""
    spec = stage.spec
    t_star = choose_t_star(out).t_star
    changes: Dict[str, Any] = {
        "name": stage.name.replace("/", "-"),
        "t_star": t_star,
        "eps": spec["eps"],
        "step_size": spec["eps"] / 10,
        "seeds": [spec["seed"]],
        "purifier": spec["purifier"],
        "attack_autocast": ROW_AUTOCAST,
    }
    if spec["attack"] == "bpda":
        changes["gradient"] = "bpda"
    if spec["attack"] == "aware":
        changes["adaptive_t"] = True
    if spec["purifier"] == "gdmp":
        changes.update(gdmp_rounds=2, gdmp_scale=9.33837890625)
    if spec["purifier"] == "gns":
        changes["gns_stages"] = [round(f * t_star, 6) for f in (0.3, 0.5, 1.0)]
    if spec["policy"] != "constant":
        changes["policy_file"] = str((out / "calibrate" / spec["policy"] / "policy.json").resolve())
    cfg = base_config(**changes)
    from . import build

    implied = build.policy_overrides(cfg)
    return cfg.replace(**implied) if implied else cfg


def autoattack_setup(cfg, defense):
    """AutoAttack-rand (APGD-CE then APGD-DLR, each ``iterations`` x EOT ``eot``) with the
    configured gradient estimator (the surrogate)."""
    from .. import attacks
    from . import build

    base = build.build_attack(cfg, defense)
    attack = attacks.autoattack_rand(
        base.attack.threat, iterations=cfg.iterations, eot=cfg.eot, gradient=base.attack.gradient
    )
    desc = base.description.replace("PGD", "AutoAttack-rand(APGD-CE,APGD-DLR)")
    return build.AttackSetup(attack, base.target, desc)


def _run_row(stage: Stage, out: Path, accept_change: bool, job: Job) -> None:
    """``ssni evaluate`` of the row's configuration into its folder; under torchrun
    :func:`~ssni.cli.evaluate.run_config` shares it among the ranks (rank 0 locks the row
    folder and writes its reports)."""
    from .evaluate import run_config

    d = out / stage.path
    _identity(job, d, "attack", accept_change)
    cfg = agree(job.group, lambda: row_config(stage, out))
    setup = autoattack_setup if stage.spec["attack"] == "autoattack" else None
    with accounted(out, stage.name, lambda: _log_count(d / LOG_NAME), job.group):
        run_config(cfg, d, progress=False, attack_setup=setup)


def _test_images(cfg):
    """The study's test images and labels, on the run's device."""
    from . import build

    x, y = build.eval_images(cfg)
    return x.to(cfg.device), y.to(cfg.device)


def _validation(cfg):
    """Validation images for the clean statistics, then the calibration images and labels (on
    the run's device)."""
    from . import build

    xv, yv = build.load_images(cfg, "val", STATS_N + CALIB_N, cfg.subset_seed)
    xv, yv = xv.to(cfg.device), yv.to(cfg.device)
    return xv[:STATS_N], xv[STATS_N:], yv[STATS_N:]


def _ssni(cfg, model, reweight: str):
    from ..core.policies import SSNI

    return SSNI(model, t_star=cfg.t_star, reweight=reweight, probe_levels=cfg.levels)


def calibration_grid(t_star: float):
    from ..eval.calibrate import level_grid

    return level_grid(t_star, CALIB_BIASES, CALIB_RESOLUTION)


def _chunked(out: Path, stage: Stage, folder: Path, config: dict, x, y, seed: int, phases: int,
             work: Callable, job: Job) -> None:
    """Append ``work(xb, yb, generators)`` (one dict per sample) for every chunk of
    ``ROW_BATCH`` samples not yet in the logs of ``folder``; ``phases`` keyed generators per
    chunk, keyed by ``(seed, chunk start, phase)``. Under torchrun the chunks left are dealt
    round robin to the ranks, each appending to its own log."""
    from ..eval.streams import keyed_generator

    group, n = job.group, x.shape[0]
    _same_everywhere(group, config)
    lg = _open_logs(job, {0: (folder, config)})[0]
    try:
        done = set().union(*gather(group, set(lg.samples)))
        todo = [
            start
            for start in range(0, n, ROW_BATCH)
            if not all((seed, i) in done for i in range(start, min(start + ROW_BATCH, n)))
        ]
        mine = share(todo, job.rank, job.world_size)

        def count() -> int:
            return len(lg.samples) if group is None else _log_count(folder / LOG_NAME)

        def run_mine() -> None:
            for start in mine:
                idx = list(range(start, min(start + ROW_BATCH, n)))
                xb, yb = x[idx[0] : idx[-1] + 1], y[idx[0] : idx[-1] + 1]
                gens = [keyed_generator(x.device, seed, start, k) for k in range(phases)]
                for i, rec in zip(idx, work(xb, yb, gens)):
                    lg.add_sample({"seed": seed, "index": i, "label": int(y[i]), **rec})
                log.info("%s: %d/%d images", stage.name, count(), n)

        with accounted(out, stage.name, count, group):
            agree(group, run_mine)
    finally:
        lg.close()


def _run_calib_table(stage: Stage, out: Path, accept_change: bool, job: Job) -> None:
    """Correctness of clean and adversarial validation images over the calibration grid and
    their EPS norms, per chunk (the adversarial ones: the study's cheap calibration attack,
    10 iterations x EOT 1 through the surrogate, against constant t*)."""
    from ..core.defense import Defense
    from ..core.policies import Constant
    from ..eval.calibrate import correctness_table
    from ..eval.log import fingerprint_data, fingerprint_module
    from . import build

    d = out / stage.path
    _identity(job, d, "attack", accept_change)

    def build_all():
        cfg = base_config(t_star=choose_t_star(out).t_star)
        model = build.build_score_model(cfg)
        classifier = build.build_classifier(cfg)
        return cfg, model, classifier, build.build_purifier(cfg, model), *_validation(cfg)[1:]

    cfg, model, classifier, purifier, x, y = agree(job.group, build_all)
    base = Defense(classifier, purifier, Constant(cfg.t_star))
    setup = build.build_attack(cfg, base, iterations=CALIB_ATTACK[0], eot=CALIB_ATTACK[1])
    probe = _ssni(cfg, model, "sigmoid")
    grid = calibration_grid(cfg.t_star)
    seed = SEEDS[0]
    config = {
        "stage": "calib-table",
        "t_star": cfg.t_star,
        "grid": grid.tolist(),
        "attack": setup.attack.config(),
        "defense": repr(base),
        "score_model": fingerprint_module(model),
        "classifier": fingerprint_module(classifier),
        "data": {"n": x.shape[0], "sha256": fingerprint_data(x, y), "split": "val"},
        "levels": cfg.levels,
        "seed": seed,
        "batch_size": ROW_BATCH,
    }

    def work(xb, yb, g):
        x_adv = setup.attack(setup.target.gradient, xb, yb, g[0])
        with torch.no_grad():
            e_clean = probe.score_norm(xb, generator=g[1])
            e_adv = probe.score_norm(x_adv, generator=g[2])
        kw = dict(votes=1, batch_size=ROW_BATCH, progress=None)
        ct = correctness_table(purifier, classifier, xb, yb, grid, generator=g[3], **kw)
        at = correctness_table(purifier, classifier, x_adv, yb, grid, generator=g[4], **kw)
        return [
            {
                "e_clean": float(e_clean[j]), "e_adv": float(e_adv[j]),
                "clean": [int(v) for v in ct[j].tolist()],
                "adv": [int(v) for v in at[j].tolist()],
            }
            for j in range(xb.shape[0])
        ]

    _chunked(out, stage, d, config, x, y, seed, 5, work, job)


def _run_calib_select(stage: Stage, out: Path, accept_change: bool, job: Job) -> None:
    """Clean statistics on ``STATS_N`` validation images, then tau and b for SSNI-N and SSNI-L
    from the logged table (max clean accuracy with robust >= constant t*'s). Under torchrun
    rank 0 does this alone (it is cheap next to the attacks) while the others wait."""
    d = out / stage.path
    _identity(job, d, "attack", accept_change)
    with accounted(out, stage.name, lambda: 0, job.group):
        _on_lead(job, _select, d, out)


def _select(d: Path, out: Path) -> None:
    from ..eval.calibrate import save_policy, select
    from ..eval.streams import keyed_generator
    from . import build

    cfg = base_config(t_star=choose_t_star(out).t_star)
    model = build.build_score_model(cfg)
    x_stats, _, _ = _validation(cfg)
    config, recs = read_log(d / "table" / "log.jsonl")
    recs = sorted(recs, key=lambda r: r["index"])
    grid = torch.tensor(config["grid"], dtype=torch.float64)
    e_clean = torch.tensor([r["e_clean"] for r in recs], dtype=torch.float64)
    e_adv = torch.tensor([r["e_adv"] for r in recs], dtype=torch.float64)
    clean_tab = torch.tensor([r["clean"] for r in recs], dtype=torch.bool)
    adv_tab = torch.tensor([r["adv"] for r in recs], dtype=torch.bool)
    for name, reweight in REWEIGHT.items():  # ssni-n, then ssni-l
        path = d / name / "policy.json"
        if path.is_file():
            continue
        policy = _ssni(cfg, model, reweight)
        gen = keyed_generator(torch.device(cfg.device), SEEDS[0], 0, 99)
        policy.fit((x_stats[i : i + 100] for i in range(0, STATS_N, 100)), generator=gen)
        result = select(policy, e_clean, e_adv, clean_tab, adv_tab, grid,
                        taus=CALIB_TAUS, biases=CALIB_BIASES, n_stats=STATS_N)
        info = {"calibration": result.to_dict(), "stats_split": "val",
                "attack": config["attack"], "code": code_commit()}
        _write_json(d / name / "calibration.json", result.to_dict())
        save_policy(path, policy, info=info)


def _run_clean_stage(stage: Stage, out: Path, accept_change: bool, job: Job) -> None:
    run_clean(out, stage.spec["levels"], seed=SEEDS[0], accept_change=accept_change, job=job)


def _run_adv_grid(stage: Stage, out: Path, accept_change: bool, job: Job) -> None:
    """Adversarial images against constant t* (the main attack) on ``ANALYZE_N`` test images,
    their correctness at every level of ``T_GRID`` and SSNI-N's t(x) of clean and adversarial
    inputs (the clean correctness comes from the clean stage, same images)."""
    from ..core.defense import Defense
    from ..core.policies import Constant
    from ..eval.analysis import correctness_grid
    from ..eval.calibrate import load_policy
    from ..eval.log import fingerprint_data, fingerprint_module
    from . import build

    d = out / stage.path
    _identity(job, d, "attack", accept_change)

    def build_all():
        cfg = base_config(t_star=choose_t_star(out).t_star, n=ANALYZE_N)
        model = build.build_score_model(cfg)
        classifier = build.build_classifier(cfg)
        policy = load_policy(out / "calibrate" / "ssni-n" / "policy.json", model)
        return (cfg, model, classifier, build.build_purifier(cfg, model), policy,
                *_test_images(cfg))

    cfg, model, classifier, purifier, policy, x, y = agree(job.group, build_all)
    base = Defense(classifier, purifier, Constant(cfg.t_star))
    setup = build.build_attack(cfg, base)
    seed = SEEDS[0]
    config = {
        "stage": "adv-grid",
        "t_star": cfg.t_star,
        "grid": list(T_GRID),
        "attack": setup.attack.config(),
        "defense": repr(base),
        "score_model": fingerprint_module(model),
        "classifier": fingerprint_module(classifier),
        "policy": fingerprint_module(policy),
        "data": {"n": x.shape[0], "sha256": fingerprint_data(x, y), "split": "test"},
        "seed": seed,
        "batch_size": ROW_BATCH,
    }

    def work(xb, yb, g):
        x_adv = setup.attack(setup.target.gradient, xb, yb, g[0])
        table = correctness_grid(purifier, classifier, x_adv, yb, T_GRID,
                                 batch_size=ROW_BATCH, generator=g[1])
        with torch.no_grad():
            t_clean = policy(xb, generator=g[2])
            t_adv = policy(x_adv, generator=g[3])
        return [
            {
                "adv": [int(v) for v in table[j].tolist()],
                "t_clean": float(t_clean[j]), "t_adv": float(t_adv[j]),
            }
            for j in range(xb.shape[0])
        ]

    _chunked(out, stage, d, config, x, y, seed, 4, work, job)


RUNNERS = {
    "clean": _run_clean_stage,
    "undefended": _run_undefended,
    "calib-table": _run_calib_table,
    "calib-select": _run_calib_select,
    "row": _run_row,
    "adv-grid": _run_adv_grid,
}


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_run(args) -> int:
    """Run (or resume) the study; under torchrun every rank runs this, rank 0 holding the
    folder lock and choosing the stages (see the module docstring)."""
    from ..io.lock import folder_lock
    from . import distributed

    # SIGTERM ends the run like Ctrl-C: logs are closed and the session is recorded
    signal.signal(signal.SIGTERM, _terminate)
    out = Path(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    global _DEVICE
    job = distributed.job(args.device)
    _DEVICE = job.device(args.device)
    base_config()  # validates the device (one-line error naming the key)

    def listing() -> int:
        if job.rank == 0:
            for stage in study_plan():
                state = describe(*stage_status(stage, out))
                why = stage_blocked(stage, out) if state != "complete" else ""
                print(f"{stage.name:<44} {state:<16} {why}".rstrip())
        return 0

    if args.list and not args.resume_from:  # reads only: works beside a running study
        return listing()
    lock = folder_lock(out)  # one study run per folder

    def take() -> None:
        if job.rank == 0:
            lock.acquire()
            if args.resume_from:
                unpack(Path(args.resume_from), out)

    agree(job.group, take)  # if rank 0 cannot take the folder, every rank stops
    try:
        if args.list:
            return listing()
        return _run_stages(out, list(args.only or []), args.accept_code_change, job)
    finally:
        lock.release()


def _next_stage(out: Path, only: List[str], failed: set) -> Optional[Stage]:
    """The first stage of the plan that is selected, unfinished, not failed and not blocked."""
    for stage in study_plan():
        if stage.name in failed or (only and not any(stage.name.startswith(o) for o in only)):
            continue
        done, need = stage_status(stage, out)
        if done >= need:
            continue
        if stage_blocked(stage, out):
            continue
        return stage
    return None


def _run_stages(out: Path, only: List[str], accept_change: bool, job: Optional[Job] = None
                ) -> int:
    """Run the stages in plan order until none is left; 1 if one failed. Under torchrun rank
    0 picks each stage and broadcasts its name, every rank runs it, and a failure on any rank
    fails the stage on all of them."""
    job = job or Job()
    group, lead = job.group, job.rank == 0
    failed: set = set()
    while True:
        stage = _on_lead(job, _next_stage, out, only, failed)
        name = broadcast(group, None if stage is None else stage.name)
        if name is None:
            log.info("nothing left to run (stages still waiting are listed by --list)")
            return 1 if broadcast(group, bool(failed)) else 0
        todo = next(s for s in study_plan() if s.name == name)
        if lead:
            log.info("%s: starting (%s)", todo.name, describe(*stage_status(todo, out)))
        try:
            agree(group, functools.partial(RUNNERS[todo.kind], todo, out, accept_change, job))
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - one failing stage must not stop the study
            if lead:
                log.error("%s: failed: %s: %s", todo.name, type(err).__name__, err)
                log.debug("failure", exc_info=True)
            failed.add(todo.name)
            continue
        if lead:
            done, need = stage_status(todo, out)
            if done < need:
                log.error("%s: stopped before completion", todo.name)
                failed.add(todo.name)
            log.info("%s: %s", todo.name, describe(done, need))


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


#: Files packed as ``.gz`` (besides the rank logs ``log.rank{r}.jsonl`` of torchrun runs).
PACKED = ("log.jsonl", "sessions.jsonl")
KEPT = ("identity.json", "config.toml", "policy.json", "calibration.json", "report.json")


#: Stands for the study folder in packed result files (resolved paths such as ``policy_file``
#: name the folder a run used; a packed copy is read from elsewhere).
STUDY_MARK = "<study>"


def pack(out: Path, dest: Path) -> List[Path]:
    """Copy the study's logs (gzip) and small result files from ``out`` into ``dest``; in the
    text of ``config.toml`` and ``report.json`` the study folder's absolute path becomes
    :data:`STUDY_MARK`."""
    import gzip
    import shutil

    root = str(out.resolve())
    written = []
    for path in sorted(out.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(out)
        if path.name in PACKED or is_log(path.name):
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
            if path.name in ("config.toml", "report.json"):
                text = path.read_text(encoding="utf-8").replace(root, STUDY_MARK)
                target.write_text(text, encoding="utf-8")
            else:
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
        "--device", default="cpu",
        help="cpu, cuda or cuda:N (under torchrun, cuda gives each rank cuda:LOCAL_RANK); a "
        "stage keeps to the device family it started on unless --accept-code-change",
    )
    r.add_argument(
        "--accept-code-change",
        action="store_true",
        help="resume stages written by other code (recorded in identity.json)",
    )
    r.set_defaults(func=cmd_run, torchrun=True)
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
