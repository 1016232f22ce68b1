"""Reports and figures: JSON/CSV/markdown tables, merges of runs, PNG plots.

A *row* is one result of one configuration and one seed::

    {"name": "fmnist-diffpure-ssni-n-pgd-linf", "seed": 121,
     "metrics": {"clean_acc": 0.91, "robust_acc": 0.55, ...},
     "config": {...every configuration key...}}

:func:`write_report` writes ``report.json`` (every row, with its configuration and seed, plus the
summary), ``report.csv`` (one line per configuration, mean and std over seeds) and ``report.md``
(the same as a markdown table). :func:`merge_reports` combines the ``report.json`` of several run
directories. Plots use matplotlib (imported lazily, Agg backend); nothing here prints.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..io.files import replacing, write_text_atomic

__all__ = [
    "REPORT_JSON",
    "REPORT_CSV",
    "REPORT_MD",
    "roc_auc",
    "mean_std",
    "summarize",
    "markdown_table",
    "write_report",
    "read_report",
    "merge_reports",
    "write_json",
    "plot_score_norm_hist",
    "plot_t_hist",
    "plot_accuracy_vs_t",
    "plot_t_map",
]

REPORT_JSON = "report.json"
REPORT_CSV = "report.csv"
REPORT_MD = "report.md"

PathLike = Union[str, "os.PathLike[str]"]
ArrayLike = Union[Sequence[float], np.ndarray, Any]

# Configuration keys shown in tables (when present in the rows' configurations).
TABLE_KEYS = (
    "dataset", "purifier", "policy", "t_star", "tau", "bias", "attack", "norm", "eps",
    "gradient", "eot", "iterations", "n",
)
# Keys that do not make two runs different configurations.
_NOT_IDENTITY = ("seeds", "device", "batch_size", "description", "resume")
# Preferred order and labels of metric columns.
METRIC_LABELS = {
    "clean_acc": "Clean acc (%)",
    "robust_acc": "Robust acc (%)",
    "robust_acc_ref": "Robust acc, reference's metric (%)",
    "auc": "ROC AUC",
    "mean_t_clean": "mean t(x) clean [steps]",
    "mean_t_adv": "mean t(x) adv [steps]",
    "nfe": "NFE",
    "seconds": "time (s)",
}
_PERCENT = ("clean_acc", "robust_acc", "robust_acc_ref")
_STEPS = ("mean_t_clean", "mean_t_adv")  # levels shown in steps of 1/1000


def _as_array(values: ArrayLike) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64).ravel()


def roc_auc(clean: ArrayLike, adv: ArrayLike) -> float:
    """Area under the ROC curve for separating ``adv`` (positives) from ``clean`` by score.

    The Mann-Whitney statistic: P(adv > clean) + P(adv == clean) / 2, using average ranks.
    """
    c, a = _as_array(clean), _as_array(adv)
    if c.size == 0 or a.size == 0:
        raise ValueError("roc_auc needs at least one clean and one adversarial score")
    scores = np.concatenate([c, a])
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    i = 0
    while i < scores.size:  # average ranks over ties
        j = i
        while j + 1 < scores.size and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    rank_sum = ranks[c.size :].sum()
    u = rank_sum - a.size * (a.size + 1) / 2.0
    return float(u / (a.size * c.size))


def mean_std(values: Iterable[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for no values."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return float(v.mean()), std


def _identity(row: Mapping[str, Any]) -> str:
    config = {k: v for k, v in (row.get("config") or {}).items() if k not in _NOT_IDENTITY}
    return json.dumps([row.get("name", ""), config], sort_keys=True, default=str)


def _metric_order(names: Iterable[str]) -> List[str]:
    names = set(names)
    first = [m for m in METRIC_LABELS if m in names]
    return first + sorted(names - set(first))


def summarize(rows: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One entry per configuration: ``name``, ``label``, ``seeds``, ``config`` and
    ``metrics`` mapping each metric to ``{"mean", "std", "values"}`` over seeds.

    Runs are the same configuration when their names and configurations agree except for
    seeds, device and batch size. Labels get the differing keys appended when two
    configurations share a name.
    """
    groups: Dict[str, List[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_identity(row), []).append(row)
    out: List[Dict[str, Any]] = []
    for members in groups.values():
        names = set()
        for r in members:
            names.update(k for k, v in r.get("metrics", {}).items() if _is_number(v))
        metrics = {}
        for m in _metric_order(names):
            vals = [float(r["metrics"][m]) for r in members if _is_number(r["metrics"].get(m))]
            mu, sd = mean_std(vals)
            metrics[m] = {"mean": mu, "std": sd, "values": vals}
        out.append(
            {
                "name": members[0].get("name", ""),
                "label": members[0].get("name", ""),
                "seeds": [r.get("seed") for r in members],
                "config": dict(members[0].get("config") or {}),
                "metrics": metrics,
            }
        )
    _disambiguate(out)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _disambiguate(entries: List[Dict[str, Any]]) -> None:
    by_name: Dict[str, List[Dict[str, Any]]] = {}
    for e in entries:
        by_name.setdefault(e["name"], []).append(e)
    for same in by_name.values():
        if len(same) < 2:
            continue
        keys = sorted({k for e in same for k in e["config"]} - set(_NOT_IDENTITY))
        differing = [k for k in keys if len({json.dumps(e["config"].get(k)) for e in same}) > 1]
        for e in same:
            extra = ", ".join(f"{k}={e['config'].get(k)}" for k in differing)
            e["label"] = f"{e['name']} [{extra}]" if extra else e["name"]


def _fmt(metric: str, stat: Mapping[str, Any]) -> str:
    mu, sd, k = stat["mean"], stat["std"], len(stat.get("values", []))
    if not math.isfinite(mu):
        return "-"
    scale = 100.0 if metric in _PERCENT else 1000.0 if metric in _STEPS else 1.0
    digits = 1 if metric in _PERCENT + _STEPS else 3
    text = f"{mu * scale:.{digits}f}"
    if k > 1:
        text += f" ± {sd * scale:.{digits}f}"
    return text


def markdown_rows(
    header: Sequence[str], rows: Sequence[Sequence[Any]], align: Optional[str] = None
) -> str:
    """A markdown table of ``header`` and ``rows``; ``align`` has one letter per column, ``l``
    or ``r`` (default: the first column left, the others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    align = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown_table(
    summary: Sequence[Mapping[str, Any]], metrics: Optional[Sequence[str]] = None
) -> str:
    """A markdown table of :func:`summarize` output: one row per configuration,
    ``mean ± std`` over seeds (accuracies in percent)."""
    if metrics is None:
        names: set = set()
        for e in summary:
            names.update(e["metrics"])
        metrics = _metric_order(names)
    header = ["Configuration", "Seeds"] + [METRIC_LABELS.get(m, m) for m in metrics]
    rows = []
    for e in summary:
        cells = [e["label"], str(len(e["seeds"]))]
        cells += [_fmt(m, e["metrics"][m]) if m in e["metrics"] else "-" for m in metrics]
        rows.append(cells)
    return markdown_rows(header, rows, align="ll" + "r" * len(metrics))


def calibration_markdown(result, name: str, policy: str, t_star: float) -> str:
    """The report of ``ssni calibrate``: baseline line, the (tau, b) grid and the choice
    (``result``: :class:`ssni.eval.calibrate.CalibrationResult`)."""
    rows = []
    for r in result.table:
        tau = "std" if r["tau"] is None else f"{r['tau_std_multiple']:.3g} std"
        rows.append(
            [
                tau,
                f"{r['bias']:.3g}",
                f"{100 * r['clean_acc']:.1f}",
                f"{100 * r['robust_acc']:.1f}",
                f"{1000 * r['mean_t_clean']:.1f}",
                f"{1000 * r['mean_t_adv']:.1f}",
                "yes" if r["feasible"] else "no",
            ]
        )
    header = ["tau", "b", "clean acc (%)", "robust acc (%)", "mean t clean", "mean t adv",
              "feasible"]
    table = markdown_rows(header, rows, align="lrrrrrl")
    base_line = (
        f"constant t* = {t_star:g}: clean {100 * result.baseline['clean_acc']:.1f} %, "
        f"robust {100 * result.baseline['robust_acc']:.1f} % "
        f"({result.n_calibration} validation images, transfer attack from constant t*)"
    )
    chosen = result.chosen
    return (
        f"# Calibration of {policy} ({name})\n\n{base_line}\n\n{table}\n"
        f"chosen: tau = {chosen['tau']}, b = {chosen['bias']:g} "
        f"(clean {100 * chosen['clean_acc']:.1f} %, robust {100 * chosen['robust_acc']:.1f} %, "
        f"objective {result.objective}, robust floor {100 * result.min_robust:.1f} %)\n"
    )


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def analysis_markdown(result, name: str, n: int, t_star: float) -> str:
    """The report of ``ssni analyze-t`` (``result``: :class:`ssni.eval.analysis.TAnalysis`):
    the four fractions and accuracy per grid level."""
    fr = result.fractions()
    grid = result.t_grid.tolist()
    rows = [
        [f"{label} acc (%)"] + [f"{100 * a:.1f}" for a in acc]
        for label, acc in result.accuracy_curves().items()
    ]
    lines = [
        f"# Per-sample optimal t ({name}, {n} images, t* = {t_star:g})",
        "",
        f"clean samples right only at t < t*:       {_pct(fr['clean_right_only_below_t_star'])}",
        f"adversarial samples right only at t > t*: {_pct(fr['adv_right_only_above_t_star'])}",
        f"clean never right on the grid:            {_pct(fr['clean_never_right'])}",
        f"adversarial never right on the grid:      {_pct(fr['adv_never_right'])}",
        "",
    ]
    return "\n".join(lines) + "\n" + markdown_rows(["t"] + [f"{1000 * t:g}" for t in grid], rows)


def _csv_rows(summary: Sequence[Mapping[str, Any]]) -> Tuple[List[str], List[Dict[str, Any]]]:
    metric_names: List[str] = []
    for e in summary:
        for m in e["metrics"]:
            if m not in metric_names:
                metric_names.append(m)
    metric_names = _metric_order(metric_names)
    config_keys = [k for k in TABLE_KEYS if any(k in e["config"] for e in summary)]
    columns = ["name", "label", "n_seeds", "seeds"] + config_keys
    for m in metric_names:
        columns += [f"{m}_mean", f"{m}_std"]
    rows = []
    for e in summary:
        row: Dict[str, Any] = {
            "name": e["name"],
            "label": e["label"],
            "n_seeds": len(e["seeds"]),
            "seeds": " ".join(str(s) for s in e["seeds"]),
        }
        for k in config_keys:
            row[k] = e["config"].get(k, "")
        for m in metric_names:
            stat = e["metrics"].get(m)
            row[f"{m}_mean"] = "" if stat is None else stat["mean"]
            row[f"{m}_std"] = "" if stat is None else stat["std"]
        rows.append(row)
    return columns, rows


def write_json(path: PathLike, data: Any) -> Path:
    """Write JSON atomically (NaN/inf become null)."""
    text = json.dumps(_clean_json(data), indent=2, sort_keys=False) + "\n"
    return write_text_atomic(path, text)


def _clean_json(data: Any) -> Any:
    if isinstance(data, dict):
        return {str(k): _clean_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_clean_json(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, np.generic):
        return _clean_json(data.item())
    return data


def write_report(
    out_dir: PathLike,
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str = "Results",
    extra: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Path]:
    """Write ``report.json``, ``report.csv`` and ``report.md`` for ``rows`` into ``out_dir``,
    each atomically (a reader sees the old or the new file, never half of one).

    Args:
        rows: per-seed results (see the module docstring).
        title: heading of the markdown file.
        extra: JSON-able entries stored under ``"extra"`` in ``report.json``; its
            ``"warnings"`` (sanity-check messages) are also listed in ``report.md``.

    Returns:
        ``{"json": path, "csv": path, "md": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    doc = {"rows": [dict(r) for r in rows], "summary": summary}
    if extra:
        doc["extra"] = dict(extra)
    paths = {"json": write_json(out / REPORT_JSON, doc)}
    columns, csv_rows = _csv_rows(summary)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(csv_rows)
    paths["csv"] = write_text_atomic(out / REPORT_CSV, buf.getvalue())
    text = f"# {title}\n\n" + markdown_table(summary)
    warnings = list((extra or {}).get("warnings") or [])
    if warnings:
        text += "\n## Warnings\n\n" + "".join(f"- {w}\n" for w in warnings)
    paths["md"] = write_text_atomic(out / REPORT_MD, text)
    return paths


def read_report(path: PathLike) -> Dict[str, Any]:
    """Load ``report.json`` from a run directory (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_JSON
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not an ssni report (not JSON)") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not an ssni report") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise ValueError(f"{path} is not an ssni report (no list of 'rows')")
    for i, row in enumerate(doc["rows"]):
        ok = (
            isinstance(row, dict)
            and isinstance(row.get("metrics", {}), dict)
            and isinstance(row.get("config") or {}, dict)
        )
        if not ok:
            raise ValueError(f"{path}: row {i} is not a result row (needs 'metrics' and 'config')")
    return doc


def merge_reports(paths: Sequence[PathLike]) -> List[Dict[str, Any]]:
    """Summaries (see :func:`summarize`) over the rows of several runs' ``report.json``.

    Rows of the same configuration and seed found in more than one run count once.
    """
    rows: List[Dict[str, Any]] = []
    seen = set()
    for p in paths:
        for row in read_report(p)["rows"]:
            key = (_identity(row), row.get("seed"))
            if key in seen:
                continue
            seen.add(key)
            rows.append(row)
    return summarize(rows)


# ----------------------------------------------------------------------------- figures


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: PathLike) -> Path:
    path = Path(path)
    import matplotlib.pyplot as plt

    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format=path.suffix[1:] or "png")
    finally:
        plt.close(fig)
    return path


def plot_image_grid(rows, path: PathLike, title: str = "") -> Path:
    """One row of grey images per ``(label, images (N, 1, H, W) in [0, 1])`` of ``rows``."""
    plt = pyplot()
    n = rows[0][1].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n, 1.2 * len(rows)), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(imgs[c, 0].detach().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_score_norm_hist(
    clean: ArrayLike, adv: ArrayLike, path: PathLike, *, title: Optional[str] = None
) -> Path:
    """Histograms of EPS score norms of clean and adversarial inputs, with the ROC AUC."""
    plt = pyplot()
    c, a = _as_array(clean), _as_array(adv)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    both = np.concatenate([c, a]) if a.size else c
    bins = np.linspace(both.min(), both.max(), 31) if both.size and np.ptp(both) > 0 else 20
    ax.hist(c, bins=bins, alpha=0.6, label=f"clean (n={c.size})", color="tab:blue")
    if a.size:
        ax.hist(a, bins=bins, alpha=0.6, label=f"adversarial (n={a.size})", color="tab:red")
    ax.set_xlabel("EPS score norm ||EPS(x)||")
    ax.set_ylabel("count")
    heading = title or "Score norms"
    if c.size and a.size:
        heading += f" (AUC {roc_auc(c, a):.3f})"
    ax.set_title(heading)
    ax.legend()
    return save_figure(fig, path)


def plot_t_hist(
    levels: Mapping[str, ArrayLike],
    path: PathLike,
    *,
    t_star: Optional[float] = None,
    title: Optional[str] = None,
) -> Path:
    """Histograms of per-sample noise levels ``t(x)``, one per entry (e.g. clean, adversarial);
    levels are shown in steps of 1/1000."""
    plt = pyplot()
    arrays = {k: _as_array(v) * 1000.0 for k, v in levels.items()}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    values = np.concatenate([v for v in arrays.values() if v.size] or [np.zeros(1)])
    lo, hi = float(values.min()), float(values.max())
    edges = max(2, min(31, math.ceil(hi) - math.floor(lo) + 2))
    bins = np.linspace(math.floor(lo) - 0.5, math.ceil(hi) + 0.5, edges)
    for label, v in arrays.items():
        ax.hist(v, bins=bins, alpha=0.55, label=f"{label} (mean {v.mean():.1f})")
    if t_star is not None:
        ax.axvline(t_star * 1000.0, color="k", ls="--", lw=1, label=f"t* = {t_star * 1000:g}")
    ax.set_xlabel("noise level t(x) [steps of 1/1000]")
    ax.set_ylabel("count")
    ax.set_title(title or "Per-sample noise levels")
    ax.legend()
    return save_figure(fig, path)


def plot_accuracy_vs_t(
    t_grid: ArrayLike,
    curves: Mapping[str, ArrayLike],
    path: PathLike,
    *,
    t_star: Optional[float] = None,
    title: Optional[str] = None,
) -> Path:
    """Accuracy (in %) against the constant noise level, one line per entry of ``curves``."""
    plt = pyplot()
    t = _as_array(t_grid) * 1000.0
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, acc in curves.items():
        ax.plot(t, _as_array(acc) * 100.0, marker="o", label=label)
    if t_star is not None:
        ax.axvline(t_star * 1000.0, color="k", ls="--", lw=1, label=f"t* = {t_star * 1000:g}")
    ax.set_xlabel("constant noise level t [steps of 1/1000]")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title or "Accuracy vs noise level")
    ax.legend()
    return save_figure(fig, path)


def _sort_rows(correct: np.ndarray) -> np.ndarray:
    """Order samples by the first level where they are right (never right: last)."""
    t_count = correct.shape[1]
    first = np.where(correct.any(1), correct.argmax(1), t_count)
    last = np.where(correct.any(1), t_count - 1 - correct[:, ::-1].argmax(1), t_count)
    return np.lexsort((last, first))


def plot_t_map(
    t_grid: ArrayLike,
    panels: Mapping[str, Tuple[ArrayLike, Optional[ArrayLike]]],
    path: PathLike,
    *,
    t_star: Optional[float] = None,
    title: Optional[str] = None,
) -> Path:
    """Per-sample correctness maps: one panel per entry ``label -> (correct, t_of_x)``.

    ``correct`` is ``(N, T)`` booleans (classifier right after purification at ``t_grid[j]``);
    rows are sorted by the first level where the sample is right. ``t_of_x`` (optional, ``(N,)``)
    marks each sample's SSNI level on its row.
    """
    plt = pyplot()
    t = _as_array(t_grid)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    edges = np.concatenate(
        [[t[0] - (t[1] - t[0]) / 2 if t.size > 1 else t[0] - 0.01],
         (t[1:] + t[:-1]) / 2,
         [t[-1] + (t[-1] - t[-2]) / 2 if t.size > 1 else t[-1] + 0.01]]
    ) * 1000.0
    for ax, (label, (correct, t_of_x)) in zip(axes[0], panels.items()):
        c = np.asarray(correct.detach().cpu() if hasattr(correct, "detach") else correct, bool)
        order = _sort_rows(c)
        ax.pcolormesh(edges, np.arange(c.shape[0] + 1), c[order], cmap="RdYlGn", vmin=0, vmax=1)
        if t_of_x is not None:
            tx = _as_array(t_of_x)[order] * 1000.0
            ax.scatter(tx, np.arange(c.shape[0]) + 0.5, s=6, c="k", marker="|", label="SSNI t(x)")
            ax.legend(loc="lower right", fontsize=7)
        if t_star is not None:
            ax.axvline(t_star * 1000.0, color="b", ls="--", lw=1)
        ax.set_title(f"{label}: right (green) / wrong (red)", fontsize=9)
        ax.set_xlabel("constant t [steps of 1/1000]")
        ax.set_ylabel("sample (sorted)")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
