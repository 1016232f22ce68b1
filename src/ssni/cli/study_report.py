"""``ssni study report``: docs/RESULTS.md and its figures from the study's logs alone.

Reads the folder written by ``ssni study run`` (plain ``.jsonl`` logs) or its packed copy
(``.jsonl.gz``, ``ssni study pack``); every number in the document is computed here from
per-sample records. Rows are marked complete, partial (images and seeds so far) or not run.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import study as st

Z95 = 1.959964


# ----------------------------------------------------------------------------- statistics


def mean_ci(values: Sequence[float]) -> Tuple[float, float, float]:
    """Mean and normal-approximation 95% interval of ``values`` (nan if fewer than 2)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    m = sum(values) / n
    if n < 2:
        return m, float("nan"), float("nan")
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    half = Z95 * math.sqrt(var / n)
    return m, m - half, m + half


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def pct(v: float, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}"


def pm(values: Sequence[float]) -> str:
    """``mean ± std`` in % over seeds (std only with >= 2 seeds)."""
    m, s = mean_std(values)
    if math.isnan(m):
        return "-"
    return f"{100 * m:.1f} ± {100 * s:.1f}" if not math.isnan(s) else f"{100 * m:.1f}"


def ci_text(m: float, lo: float, hi: float) -> str:
    if math.isnan(m):
        return "-"
    if math.isnan(lo):
        return f"{100 * m:+.1f}"
    return f"{100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


# ----------------------------------------------------------------------------- reading


def sessions(root: Path) -> Dict[str, Dict[str, Any]]:
    """Per stage: wall seconds, samples done and score-network images over all sessions (the
    last line of each session counts)."""
    import gzip

    last: Dict[str, dict] = {}
    for p in (root / "sessions.jsonl", root / "sessions.jsonl.gz"):
        if p.is_file():
            opener = gzip.open if p.suffix == ".gz" else open
            with opener(p, "rt", encoding="utf-8") as f:
                for k, line in enumerate(f):
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    last[rec.get("session", f"line{k}")] = rec
            break
    out: Dict[str, Dict[str, Any]] = {}
    for rec in last.values():
        s = out.setdefault(rec["stage"], {"seconds": 0.0, "cpu_seconds": 0.0, "samples": 0.0,
                                          "net_images": 0.0, "sessions": 0, "commits": set()})
        s["seconds"] += rec["seconds"]
        s["cpu_seconds"] += rec.get("cpu_seconds", float("nan"))
        s["samples"] += max(0, rec["samples_after"] - rec["samples_before"])
        s["net_images"] += rec.get("net_images", 0)
        s["sessions"] += 1
        s["commits"].add(rec.get("commit", "?"))
    return out


class Row:
    """One evaluated configuration over the seeds found (records keyed by seed)."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.by_seed: Dict[int, List[dict]] = {}
        self.config: Optional[dict] = None
        self.run_config: Dict[str, Any] = {}
        for seed in st.SEEDS:
            d = root / "rows" / name / f"seed{seed}"
            cfg, recs = st.read_log(d / "log.jsonl")
            if recs:
                self.by_seed[seed] = recs
                self.config = self.config or cfg
                self.run_config = self.run_config or _read_toml(d / "config.toml")

    @property
    def complete_seeds(self) -> List[int]:
        return [s for s, r in self.by_seed.items() if len(r) >= st.ROBUST_N]

    def status(self) -> str:
        if not self.by_seed:
            return "not run"
        full = self.complete_seeds
        if len(full) == len(st.SEEDS):
            return f"complete ({st.ROBUST_N} images x {len(full)} seeds)"
        parts = [f"seed {s}: {len(r)}/{st.ROBUST_N}" for s, r in sorted(self.by_seed.items())]
        return "partial (" + ", ".join(parts) + ")"

    def acc(self, key: str) -> List[float]:
        return [sum(r[key] for r in recs) / len(recs) for recs in self.by_seed.values()]

    def mean_of(self, key: str) -> float:
        vals = [r[key] for recs in self.by_seed.values() for r in recs if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    def values(self, key: str) -> List[float]:
        return [r[key] for recs in self.by_seed.values() for r in recs if r.get(key) is not None]


def _read_toml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        import tomllib
    except ImportError:  # pragma: no cover
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - a broken file only loses the description
        return {}


def paired(a: Row, b: Row, key: str) -> Tuple[float, float, float, int, List[int]]:
    """Mean difference ``a - b`` of a per-sample 0/1 ``key`` over the images and seeds both
    rows have, with a 95% interval over images (each image's difference averaged over seeds)."""
    seeds = sorted(set(a.by_seed) & set(b.by_seed))
    per_image: Dict[int, List[float]] = defaultdict(list)
    for s in seeds:
        ra = {r["index"]: r for r in a.by_seed[s]}
        rb = {r["index"]: r for r in b.by_seed[s]}
        for i in sorted(set(ra) & set(rb)):
            per_image[i].append(float(ra[i][key]) - float(rb[i][key]))
    diffs = [sum(v) / len(v) for v in per_image.values()]
    m, lo, hi = mean_ci(diffs)
    return m, lo, hi, len(diffs), seeds


def clean_loss(root: Path, const: Row, other: Row) -> Optional[Tuple[float, int]]:
    """``(points, images)``: the clean accuracy the classifier alone has and constant DiffPure
    loses, as a fraction, on the images and seeds ``const`` and ``other`` share (the classifier
    is deterministic; constant DiffPure's correctness is averaged over the seeds); None before
    the undefended stage has run."""
    _, plain = st.read_log(root / "undefended" / f"pgd-eps{st.EPS_MAIN:.3f}" / "log.jsonl")
    alone = {r["index"]: float(r["clean_correct"]) for r in plain}
    per_image: Dict[int, List[float]] = defaultdict(list)
    for s in sorted(set(const.by_seed) & set(other.by_seed)):
        shared = {r["index"] for r in other.by_seed[s]}
        for r in const.by_seed[s]:
            if r["index"] in shared and r["index"] in alone:
                per_image[r["index"]].append(alone[r["index"]] - float(r["clean_correct"]))
    if not per_image:
        return None
    return sum(sum(v) / len(v) for v in per_image.values()) / len(per_image), len(per_image)


# ----------------------------------------------------------------------------- sections


def _clean_section(root: Path, figures: Path, rel: str) -> Tuple[List[str], Optional[float]]:
    choice = st.choose_t_star(root)
    levels = st.clean_levels(root)
    lines = [
        "## 1. Choice of t*: clean accuracy of constant DiffPure (no attack)",
        "",
        f"DDPM reverse steps of 1/1000 (t = 0.1 is 100 steps), shipped weights, the first "
        f"{st.CLEAN_N} images of the fixed test subset (`subset_seed = 0`), one purification "
        f"per image (seed {st.SEEDS[0]}). The classifier alone is scored on the same images; the "
        "drop is paired (same images), with a 95% interval.",
        "",
        "| t | images | DiffPure clean acc (%) | classifier alone (%) | drop (points) [95% CI] "
        "| status |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    curve_t, curve_acc = [], []
    for t in st.T_GRID:
        recs = levels.get(t, [])
        if not recs:
            lines.append(f"| {t:g} | 0 | - | - | - | not run |")
            continue
        acc = sum(r["correct"] for r in recs) / len(recs)
        plain = sum(r["plain_correct"] for r in recs) / len(recs)
        d = mean_ci([float(r["plain_correct"]) - float(r["correct"]) for r in recs])
        state = "complete" if len(recs) >= st.CLEAN_N else f"partial {len(recs)}/{st.CLEAN_N}"
        lines.append(
            f"| {t:g} | {len(recs)} | {pct(acc)} | {pct(plain)} | "
            f"{ci_text(*d).lstrip('+')} | {state} |"
        )
        curve_t.append(t)
        curve_acc.append(acc)
    lines.append("")
    if choice.t_star is not None:
        lines.append(
            f"**Main-table t* = {choice.t_star:g}** ({round(1000 * choice.t_star)} steps): the "
            f"smallest level where constant DiffPure loses at least {100 * st.CLEAN_DROP:g} clean "
            "points against the classifier alone."
        )
    else:
        lines.append(f"**t* is not decided yet**: {choice.reason}. Every stage that needs t* "
                     "waits for it.")
    if len(curve_t) >= 2:
        from ..eval import reports

        reports.plot_accuracy_vs_t(
            curve_t, {"DiffPure, clean": curve_acc}, figures / "clean_accuracy_vs_t.png",
            t_star=choice.t_star, title="Clean accuracy of constant DiffPure",
        )
        lines += ["", f"![clean accuracy vs t]({rel}/clean_accuracy_vs_t.png)"]
    return lines + [""], choice.t_star


def _calibration_section(root: Path) -> List[str]:
    lines = ["## 2. Calibration of tau and b (validation split only)", ""]
    table_n = len(st.read_log(root / "calibrate" / "table" / "log.jsonl")[1])
    lines.append(
        f"Table stage: {table_n}/{st.CALIB_N} validation images (clean and attacked with "
        f"{st.CALIB_ATTACK[0]} iterations x EOT {st.CALIB_ATTACK[1]} through the surrogate against "
        "constant t*), correctness on a grid of "
        f"levels every {st.CALIB_RESOLUTION:g}; clean statistics from {st.STATS_N} other "
        f"validation images; tau in {list(st.CALIB_TAUS)} x std, b in {list(st.CALIB_BIASES)}; "
        "objective: highest clean accuracy with robust accuracy >= constant t*'s."
    )
    lines.append("")
    found = False
    for name in ("ssni-n", "ssni-l"):
        path = root / "calibrate" / name / "calibration.json"
        if not path.is_file():
            continue
        found = True
        doc = json.loads(path.read_text(encoding="utf-8"))
        ch = doc["chosen"]
        default = next(
            (r for r in doc["table"] if r["bias"] == 0.0
             and (r["tau"] is None or abs((r["tau_std_multiple"] or 0) - 1.0) < 1e-9)),
            None,
        )
        tau = "std (unused by SSNI-L)" if ch["tau"] is None else f"{ch['tau_std_multiple']:g} x std"
        lines.append(
            f"- **{name}**: chosen tau = {tau}, b = {ch['bias']:g}: validation clean "
            f"{pct(ch['clean_acc'])} %, robust {pct(ch['robust_acc'])} % (constant t*: clean "
            f"{pct(doc['baseline']['clean_acc'])} %, "
            f"robust {pct(doc['baseline']['robust_acc'])} %)."
        )
        if default is not None:
            lines.append(
                f"  Defaults (tau = std, b = 0): clean {pct(default['clean_acc'])} %, robust "
                f"{pct(default['robust_acc'])} %, mean t clean/adv "
                f"{1000 * default['mean_t_clean']:.0f}/{1000 * default['mean_t_adv']:.0f} steps."
            )
    if not found:
        lines.append("Not run yet (needs t*).")
    return lines + [""]


def _cost(row: Row, stage_time: Dict[str, Dict[str, float]]) -> Tuple[str, str, str]:
    """Network calls per clean inference, per image of the attack run, seconds per image."""
    t_star = row.run_config.get("t_star")
    policy = row.run_config.get("policy", "constant")
    infer = "-"
    if t_star is not None and row.run_config.get("purifier") == "diffpure":
        if policy == "constant":
            infer = f"{round(1000 * t_star)}"
        else:
            tc = row.values("t_clean")
            if tc:
                steps = sum(math.ceil(1000 * t - 1e-6) for t in tc) / len(tc)
                infer = f"{row.run_config.get('levels', 20) + steps:.0f}"
    secs = samples = net = 0.0
    for s in row.by_seed:
        rec = stage_time.get(f"{row.name}/seed{s}")
        if rec:
            secs += rec["seconds"]
            samples += rec["samples"]
            net += rec["net_images"]
    if samples <= 0:
        return infer, "-", "-"
    return infer, f"{net / samples:,.0f}", f"{secs / samples:.0f}"


def _row_table(rows: List[Tuple[str, Row]], stage_time) -> List[str]:
    lines = [
        "| defense | clean acc (%) | robust acc (%) | mean t(x) clean / adv [steps] | "
        "net calls per clean inference | net calls per image, attack run | s per image | status |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, row in rows:
        if not row.by_seed:
            lines.append(f"| {label} | - | - | - | - | - | - | not run |")
            continue
        tc, ta = row.mean_of("t_clean"), row.mean_of("t_adv")
        t_txt = "-" if math.isnan(tc) else f"{1000 * tc:.0f} / {1000 * ta:.0f}"
        infer, per_img, secs = _cost(row, stage_time)
        lines.append(
            f"| {label} | {pm(row.acc('clean_correct'))} | {pm(row.acc('robust'))} | {t_txt} | "
            f"{infer} | {per_img} | {secs} | {row.status()} |"
        )
    return lines


def _undefended(root: Path, attack: str, eps: float) -> str:
    _, recs = st.read_log(root / "undefended" / f"{attack}-eps{eps:.3f}" / "log.jsonl")
    if not recs:
        return "| classifier alone (no purification) | - | - | - | - | - | - | not run |"
    clean = sum(r["clean_correct"] for r in recs) / len(recs)
    rob = sum(r["robust"] for r in recs) / len(recs)
    state = "complete" if len(recs) >= st.ROBUST_N else f"partial {len(recs)}/{st.ROBUST_N}"
    return (
        f"| classifier alone (no purification) | {pct(clean)} | {pct(rob)} | - | 0 | - | - | "
        f"{state}, seed {st.SEEDS[0]} |"
    )


def _paired_lines(root: Path, base: str, attack: str, eps: float) -> List[str]:
    const = Row(st.row_name(base, "constant", attack, eps), root)
    lines = []
    for pol in ("ssni-n", "ssni-l"):
        other = Row(st.row_name(base, pol, attack, eps), root)
        if not (const.by_seed and other.by_seed):
            lines.append(f"| {pol.upper()} - constant | - | - | - | not run |")
            continue
        c = paired(other, const, "clean_correct")
        r = paired(other, const, "robust")
        lines.append(
            f"| {pol.upper()} - constant | {', '.join(map(str, c[4])) or '-'} | {c[3]} | "
            f"{ci_text(*c[:3])} | {ci_text(*r[:3])} |"
        )
    return lines


ROW_LABELS = {"constant": "constant t*", "ssni-n": "SSNI-N", "ssni-l": "SSNI-L"}


def _attack_block(root, title, base, attack, eps, stage_time, undefended=None) -> List[str]:
    rows = [(f"{base.upper() if base != 'diffpure' else 'DiffPure'} + {ROW_LABELS[p]}",
             Row(st.row_name(base, p, attack, eps), root)) for p in st.POLICIES]
    if attack == "aware":
        rows = rows[1:]
    lines = [f"### {title}", ""] + _row_table(rows, stage_time)
    if undefended:
        lines.append(_undefended(root, *undefended))
    if attack != "aware":
        lines += [
            "",
            "Paired differences (same images, same seeds; 95% interval over images, each image's "
            "difference averaged over the seeds both rows have), in points:",
            "",
            "| comparison | seeds | images | clean acc difference | robust acc difference |",
            "|---|---|---:|---:|---:|",
        ] + _paired_lines(root, base, attack, eps)
    return lines + [""]


def _t_hist(root: Path, figures: Path, rel: str, t_star: Optional[float]) -> List[str]:
    from ..eval import reports

    lines = []
    for pol in ("ssni-n", "ssni-l"):
        row = Row(st.row_name("diffpure", pol, "pgd", st.EPS_MAIN), root)
        tc, ta = row.values("t_clean"), row.values("t_adv")
        if not tc:
            continue
        name = f"t_hist_{pol}.png"
        levels = {"clean": tc}
        if ta:
            levels["adversarial (PGD-EOT)"] = ta
        reports.plot_t_hist(levels, figures / name, t_star=t_star,
                            title=f"DiffPure + {pol.upper()}: t(x), {len(tc)} clean images")
        lines.append(f"![t(x) histogram {pol}]({rel}/{name})")
    return lines


def _analyze_section(root: Path, figures: Path, rel: str, t_star) -> List[str]:
    from ..eval import reports

    cfg, recs = st.read_log(root / "analyze-t" / "log.jsonl")
    lines = ["## 5. Per-sample optimal t (`analyze-t`)", ""]
    if not recs:
        return lines + ["Not run yet.", ""]
    levels = st.clean_levels(root)
    grid = [t for t in st.T_GRID if t in levels]
    clean_by_level = {t: {r["index"]: r["correct"] for r in levels[t]} for t in grid}
    idx = [r["index"] for r in recs if all(r["index"] in clean_by_level[t] for t in grid)]
    lines.append(
        f"{len(recs)}/{st.ANALYZE_N} test images attacked (main attack, against constant t*), "
        f"adversarial correctness at t in {list(st.T_GRID)}; clean correctness from section 1 "
        f"on the same images ({len(idx)} of them have every clean level so far)."
    )
    import numpy as np

    adv = np.array([r["adv"] for r in recs], dtype=bool)
    curves = {"adversarial": adv.mean(0)}
    lines += ["", "| t | " + " | ".join(f"{t:g}" for t in st.T_GRID) + " |",
              "|---|" + "---:|" * len(st.T_GRID),
              "| adversarial acc (%) | " + " | ".join(pct(v) for v in adv.mean(0)) + " |"]
    if idx and len(grid) == len(st.T_GRID):
        by = {r["index"]: r for r in recs}
        clean = np.array([[clean_by_level[t][i] for t in grid] for i in idx], dtype=bool)
        advs = np.array([by[i]["adv"] for i in idx], dtype=bool)
        ts = np.array(st.T_GRID)
        below, above = ts < t_star - 1e-9, ts > t_star + 1e-9
        f_clean = float((clean[:, below].any(1) & ~clean[:, ~below].any(1)).mean())
        f_adv = float((advs[:, above].any(1) & ~advs[:, ~above].any(1)).mean())
        curves["clean"] = clean.mean(0)
        lines += [
            "| clean acc (%) | " + " | ".join(pct(v) for v in clean.mean(0)) + " |", "",
            f"Clean images right only below t*: {pct(f_clean)} %; adversarial images right only "
            f"above t*: {pct(f_adv)} % ({len(idx)} images).",
        ]
        reports.plot_t_map(
            ts,
            {
                "clean": (clean, [by[i]["t_clean"] for i in idx]),
                "adversarial": (advs, [by[i]["t_adv"] for i in idx]),
            },
            figures / "t_map.png", t_star=t_star, title="correctness per sample and level",
        )
        lines += ["", f"![per-sample map]({rel}/t_map.png)"]
    reports.plot_accuracy_vs_t(list(st.T_GRID), curves, figures / "analyze_t_accuracy.png",
                               t_star=t_star, title="Accuracy vs constant t")
    lines += ["", f"![accuracy vs t]({rel}/analyze_t_accuracy.png)"]
    return lines + [""]


# ----------------------------------------------------------------------------- conclusion


def _conclusion(root: Path, t_star: Optional[float]) -> List[str]:
    out = ["## Conclusion so far", ""]
    if t_star is None:
        out.append(
            "No conclusion yet: the clean-accuracy stage that picks t* is not finished, so no "
            "attacked row has run, and nothing below says whether SSNI helps. The numbers below "
            "are partial and only describe clean purification."
        )
        guess = next((r for r in st.choose_t_star(root).rows
                      if r.get("n") and r["drop"] >= st.CLEAN_DROP), None)
        if guess is not None:
            out.append(
                f"Provisional reading, not the protocol's decision: on the {guess['n']} images "
                f"run so far, t = {guess['t']:g} is the smallest level losing at least "
                f"{100 * st.CLEAN_DROP:g} clean points ({100 * guess['drop']:.1f} points), so the "
                f"main table will probably use t* = {guess['t']:g}; smaller levels lose less "
                "(section 1)."
            )
        return out + [""]
    choice = st.choose_t_star(root)
    row_t = next(r for r in choice.rows if r["t"] == t_star)
    out.append(
        f"At t* = {t_star:g}, constant DiffPure loses {100 * row_t['drop']:.1f} clean points "
        f"against the classifier alone ({row_t['n']} images)."
    )
    const = Row(st.row_name("diffpure", "constant", "pgd", st.EPS_MAIN), root)
    for pol in ("ssni-n", "ssni-l"):
        other = Row(st.row_name("diffpure", pol, "pgd", st.EPS_MAIN), root)
        if not (const.by_seed and other.by_seed):
            out.append(f"{pol.upper()}: no paired attacked result yet.")
            continue
        c = paired(other, const, "clean_correct")
        r = paired(other, const, "robust")
        loss = clean_loss(root, const, other)
        if loss is not None and loss[0] > 0 and not math.isnan(c[0]):
            out.append(
                f"On the {loss[1]} images of the attacked rows, constant DiffPure loses "
                f"{100 * loss[0]:.1f} clean points against the classifier alone (seeds "
                f"{', '.join(map(str, c[4]))}); {pol.upper()} gives back {100 * c[0]:.1f} of "
                f"them ({100 * c[0] / loss[0]:.0f}% of the loss; interval below)."
            )
        verdict = []
        for what, (m, lo, hi, _n, _seeds) in (("clean accuracy", c), ("robust accuracy", r)):
            if math.isnan(lo):
                verdict.append(f"{what} {100 * m:+.1f} points (too few images for an interval)")
            elif lo > 0 or hi < 0:
                verdict.append(f"{what} {100 * m:+.1f} points (95% CI {100 * lo:+.1f} to "
                               f"{100 * hi:+.1f}: a real difference)")
            else:
                verdict.append(f"{what} {100 * m:+.1f} points (95% CI {100 * lo:+.1f} to "
                               f"{100 * hi:+.1f}: within noise; a loss of up to "
                               f"{-100 * lo:.1f} points is not excluded)")
        out.append(
            f"{pol.upper()} minus constant on the same {c[3]} images, seeds "
            f"{', '.join(map(str, c[4]))} (PGD-EOT, eps {st.EPS_MAIN:g}): " + "; ".join(verdict)
            + ("." if len(c[4]) == len(st.SEEDS) and c[3] >= st.ROBUST_N
               else " (partial: not every image and seed yet)."))
    if const.by_seed:
        out.append(
            "This attack takes its gradients through a shorter surrogate purification at each "
            "image's own noise level, treating the level as fixed; whether the result holds "
            "under BPDA, AutoAttack-rand, a smaller eps, GDMP/GNS and the policy-aware attack "
            "is in section 4."
        )
    return out + [""]


# ----------------------------------------------------------------------------- document


def _budget(t_star: Optional[float]) -> List[str]:
    b = st.BASE
    ts = "t* (chosen in section 1)" if t_star is None else f"t* = {t_star:g}"
    return [
        "## Protocol and budget",
        "",
        "| | paper (CIFAR-10) | this study (Fashion-MNIST) |",
        "|---|---|---|",
        "| models | score_sde DDPM++, WRN-28-10 | shipped `fmnist_unet` (1.1M) and `fmnist_cnn` |",
        f"| defense | DiffPure DDPM, steps of 1/1000, t* = 0.1 | DiffPure DDPM, steps of 1/1000,"
        f" {ts} |",
        f"| test images | 512 | {st.ROBUST_N} per row (the same images for every row); "
        f"{st.CLEAN_N} for the clean t* choice; {st.ANALYZE_N} for analyze-t |",
        f"| seeds | 121, 122, 123 | {', '.join(map(str, st.SEEDS))} (main rows first) |",
        f"| PGD-EOT | 200 iterations x EOT 20, step 0.007, Linf 8/255 | {b['iterations']} "
        f"iterations x EOT {b['eot']}, step eps/10, Linf eps {st.EPS_MAIN:g} and "
        f"{st.EPS_SMALL:g} (reduced) |",
        f"| attack gradients | exact backprop through a 20-step surrogate | through a "
        f"{b['surrogate_steps']}-step surrogate (reduced), gradient passes under "
        f"{st.ROW_AUTOCAST} autocast (reduced precision; predictions in fp32); success judged "
        "on the real defense |",
        f"| SSNI | K = 20 levels, statistics of 5000 clean images | K = {b['levels']}, "
        f"statistics of {st.STATS_N} validation images (reduced) |",
        f"| AutoAttack-rand | APGD-CE + APGD-DLR, 100 iterations x EOT 20 | {b['iterations']} "
        f"iterations x EOT {b['eot']} each, same surrogate (reduced) |",
        "| BPDA-EOT | BPDA + EOT 20 | straight-through gradient at the purified point, "
        f"EOT {b['eot']} |",
        "| GDMP / GNS | paper's settings | GDMP: 2 rounds of DDPM steps of 1/1000 from t*; GNS: "
        "stages 0.3 t*, 0.5 t*, t* (the Fashion-MNIST presets' ratios) |",
        "",
    ]


def write_results(root: Path, docs: Path, figures: Path) -> List[Path]:
    """Write ``docs`` (markdown) and its figures into ``figures`` from the logs under ``root``."""
    figures.mkdir(parents=True, exist_ok=True)
    docs.parent.mkdir(parents=True, exist_ok=True)
    try:
        rel = figures.resolve().relative_to(docs.parent.resolve()).as_posix()
    except ValueError:
        rel = figures.resolve().as_posix()
    stage_time = sessions(root)
    plan = st.study_plan()
    states = {s.name: st.describe(*st.stage_status(s, root)) for s in plan}
    n_done = sum(v == "complete" for v in states.values())
    commits = sorted({c for s in stage_time.values() for c in s.get("commits", ())})
    lines = [
        "# Results: SSNI against constant-t DiffPure on Fashion-MNIST",
        "",
        "<!-- written by `ssni study report`; do not edit by hand -->",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the logs in "
        f"`{root.as_posix()}` alone. Stages complete: {n_done} of {len(plan)}. Code commits "
        f"that wrote these logs: {', '.join(commits) or '-'}. This study runs for days on a "
        "2-core CPU: rows marked partial or not run are still in progress, and a partial "
        "number is a number on fewer images or seeds than the protocol asks for.",
        "",
        "The question: at the t* where constant DiffPure loses >= 4 clean points, how much of "
        "that loss does SSNI-N recover, at what change in robust accuracy?",
        "",
    ]
    clean_lines, t_star = _clean_section(root, figures, rel)
    lines += _conclusion(root, t_star)
    lines += _budget(t_star)
    lines += clean_lines
    lines += _calibration_section(root)
    lines += ["## 3. Main table: DiffPure, PGD-EOT", ""]
    lines += _attack_block(root, f"PGD-EOT Linf eps = {st.EPS_MAIN:g} (surrogate gradients)",
                           "diffpure", "pgd", st.EPS_MAIN, stage_time,
                           undefended=("pgd", st.EPS_MAIN))
    lines += _t_hist(root, figures, rel, t_star) + [""]
    lines += ["## 4. Other attacks, budgets and purifiers", ""]
    lines += _attack_block(root, "BPDA-EOT, eps = 0.1", "diffpure", "bpda", st.EPS_MAIN,
                           stage_time)
    lines += _attack_block(root, f"PGD-EOT, smaller eps = {st.EPS_SMALL:g}", "diffpure", "pgd",
                           st.EPS_SMALL, stage_time, undefended=("pgd", st.EPS_SMALL))
    lines += _attack_block(root, "AutoAttack-rand (APGD-CE + APGD-DLR), eps = 0.1", "diffpure",
                           "autoattack", st.EPS_MAIN, stage_time,
                           undefended=("autoattack", st.EPS_MAIN))
    lines += _attack_block(
        root, "Policy-aware attack (gradients through the relaxed SSNI level t(x)), eps = 0.1",
        "diffpure", "aware", st.EPS_MAIN, stage_time)
    lines += _attack_block(root, "GDMP, PGD-EOT eps = 0.1", "gdmp", "pgd", st.EPS_MAIN,
                           stage_time)
    lines += _attack_block(root, "GNS, PGD-EOT eps = 0.1", "gns", "pgd", st.EPS_MAIN, stage_time)
    lines += _analyze_section(root, figures, rel, t_star)
    lines += _companions(root)
    lines += _stage_list(plan, states, stage_time, root)
    lines += _code_versions(root)
    lines += _howto()
    text = "\n".join(lines).rstrip() + "\n"
    docs.write_text(text, encoding="utf-8")
    return [docs, figures]


#: Comparisons run outside the study's stages, at the presets' reduced CPU budget, each with
#: its logs and a ``summary.md`` written from them in a folder beside the study's logs:
#: (folder, title, command that writes the summary, page with the set-up and conclusion).
COMPANIONS = (
    ("policy_attacks", "Policy-aware attacks on SSNI-N, worst case and protocols",
     "python benchmarks/ssni_policy_attacks.py --report-only --out docs/results/policy_attacks "
     "--presets fmnist-diffpure-ssni-n-pgd-linf --eps 0.1 0.05 --attacks reference constrained",
     "README.md, \"Measured results\""),
    ("learned_policy", "A learned noise-level policy (SSNI-Learned) against SSNI-N/L",
     "python benchmarks/learned_policy_study.py --out <the logs, gunzipped> --summary",
     "docs/RESULTS_learned_policy.md"),
)


def _companions(root: Path) -> List[str]:
    """Section 6: the companion comparisons' summaries, copied from their ``summary.md``."""
    lines = [
        "## 6. Beyond the study's stages (reduced budget)",
        "",
        "These comparisons use the Fashion-MNIST presets' CPU budget (DiffPure with 10 reverse "
        "steps at t* = 0.1, PGD-EOT 5 x 2 through a 3-step surrogate, K = 10), not the study's; "
        "their numbers are comparable with each other, not with sections 1-5.",
        "",
    ]
    for folder, title, command, page in COMPANIONS:
        path = root.parent / folder / "summary.md"
        lines += [f"### {title}", ""]
        if not path.is_file():
            lines += [f"Not run yet (`{command}` writes `{path.as_posix()}`).", ""]
            continue
        lines += [path.read_text(encoding="utf-8").rstrip(), "",
                  f"From `{path.as_posix()}`, written from the committed logs by `{command}`; "
                  f"set-up and conclusion in {page}.", ""]
    return lines


def _stage_list(plan, states, stage_time, root: Path) -> List[str]:
    lines = [
        "## Stages, wall time and network calls",
        "",
        "Wall time is the sum over sessions on a shared 2-core machine (other jobs, such as "
        "tests and benchmarks, often ran beside it, so wall time is an upper bound of the "
        "cost); CPU time is the study process's own (all its threads), a measure of the "
        "work that does not depend on the other jobs. Network calls count images through the "
        "score network, attack and final predictions included. Time left extrapolates the "
        "stage's own pace so far (wall and CPU).",
        "",
        "| stage | state | wall time | CPU time | samples this far | net calls per sample | "
        "time left (wall / CPU) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in plan:
        rec = stage_time.get(s.name)
        if rec is None and s.kind == "clean":
            key = "clean:" + ",".join(st.level_name(t) for t in s.spec["levels"])
            rec = stage_time.get(key)
        secs = "-" if not rec else f"{rec['seconds'] / 3600:.2f} h"
        cpu = "-"
        if rec and not math.isnan(rec["cpu_seconds"]):
            cpu = f"{rec['cpu_seconds'] / 3600:.2f} h"
        per = "-" if not rec or not rec["samples"] else f"{rec['net_images'] / rec['samples']:,.0f}"
        samples = "-" if not rec else f"{rec['samples']:.0f}"
        left = "-"
        done, need = st.stage_status(s, root)
        if rec and rec["samples"] and done < need:
            k = (need - done) / rec["samples"] / 3600
            left = f"{k * rec['seconds']:.1f} h / {k * rec['cpu_seconds']:.1f} h"
        lines.append(
            f"| {s.name} | {states[s.name]} | {secs} | {cpu} | {samples} | {per} | {left} |"
        )
    return lines + [""]


def _code_versions(root: Path) -> List[str]:
    lines = [
        "## Code versions",
        "",
        "Per stage folder: the fingerprint of the code that computes its numbers, the commit "
        "that first wrote it, and every later change of code it accepted (and how). A commit "
        "that is not on the main line is a pre-merge commit of the study code; the fingerprint, "
        "not the commit, identifies the code that computed the numbers.",
        "",
        "| stage folder | first code | first commit | later code accepted |",
        "|---|---|---|---|",
    ]
    found = False
    for path in sorted(root.rglob("identity.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        hist = doc.get("history", [])
        later = "; ".join(
            f"{h['code']} (commit {h.get('commit', '?')}): {h.get('how', '?')}" for h in hist
        )
        code = doc.get("first_code", doc.get("code")) if not hist else doc.get("first_code", "?")
        rel = path.parent.relative_to(root).as_posix()
        lines.append(f"| {rel} | {code} | {doc.get('commit', '?')} | {later or '-'} |")
        found = True
    if not found:
        lines.append("| - | - | - | - |")
    return lines + [""]


def _howto() -> List[str]:
    return [
        "## Commands: reproduce, resume, regenerate",
        "",
        "```bash",
        "# run (or resume) every stage in order; killing it loses at most the chunk in progress;",
        "# run it from a fixed checkout (git worktree add ../study-run <commit>) so that later",
        "# merges cannot change the code under a running job",
        "nice -n 15 ssni study run --out runs/study",
        "# how the attack rows here were run on a 2-core CPU: two ranks of one thread each",
        "# (each rank takes its share of every chunk; results do not depend on the rank count)",
        "OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m ssni study run \\",
        "    --out runs/study --resume-from docs/results/study --threads 1",
        "# on a GPU (torchrun gives each rank cuda:LOCAL_RANK)",
        "ssni study run --out runs/study --device cuda",
        "# start from the committed logs instead of from scratch",
        "ssni study run --out runs/study --resume-from docs/results/study",
        "ssni study run --out runs/study --list          # every stage and its state",
        "# commit the progress: compressed logs into the repository, then this document",
        "ssni study pack --out runs/study --to docs/results/study",
        "ssni study report --logs docs/results/study --docs docs/RESULTS.md",
        "```",
        "",
        "Each stage folder holds `identity.json` with the fingerprint of the code that computes "
        "its numbers (syntax trees of those modules, docstrings and comments excluded) and the "
        "commit. `ssni study run` refuses to extend a stage written by other code (random "
        "streams or algorithms may differ, and one log must not mix them); "
        "`--accept-code-change` overrides this and records the change in `identity.json`. "
        "Evaluate logs also refuse a changed configuration (every key that reaches "
        "`evaluate`: defense, attack, data hash, seeds, batch size), so adding configuration "
        "keys with defaults does not mix results, but a code change that keeps the "
        "configuration identical is caught only by the fingerprint.",
        "",
    ]
