"""Long scores -> wide comparison table: one row per method, one column per benchmark task.

Input (long, one row per method x seed x task x metric; what `evals.sweep` writes to scores.csv):
    method, seed, checkpoint, task, task_version, metric, value, n, git_revision, date
Output (wide, one row per method, baseline first):
    method, seeds (the seeds found), then per task column `T` (T = task name, "@<version>" appended when
    the long table holds more than one version of the task):
        "T [<protocol>]"   display string "mean ± std" over seeds (just the mean with one seed)
        "T mean", "T std"  numeric; std is the sample std (ddof=1), NaN with one seed
        "T seeds"          number of seeds with a value
        "T delta"          mean(method) - mean(baseline)
        "T p"              two-sided paired t-test (scipy.stats.ttest_rel) of the method's and the
                           baseline's per-seed values, paired by seed; NaN (with a note) for fewer than two
                           common seeds or a constant difference
    and `notes`, `git_revision` (the revisions the row's values came from).

Only each task's headline metric is tabulated (`HEADLINE`, from evals.tasks; override per call). Versions
are never averaged together (docs/architecture.md, Conventions): a task with several versions gets one
column per version and a note says so.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from evals.tasks import HEADLINE, PROTOCOLS

LONG_COLUMNS = (
    "method", "seed", "checkpoint", "task", "task_version", "metric", "value", "n", "git_revision", "date",
)  # fmt: skip
FIELDS = ("mean", "std", "seeds", "delta", "p")


def check_long(long: pd.DataFrame) -> None:
    """ValueError unless `long` has the long columns and no (method, seed, task, version, metric) twice."""
    missing = [c for c in LONG_COLUMNS if c not in long.columns]
    if missing:
        raise ValueError(f"scores table lacks column(s) {missing}; expected {list(LONG_COLUMNS)}")
    key = ["method", "seed", "task", "task_version", "metric"]
    dup = long[long.duplicated(key, keep=False)]
    if len(dup):
        first = dup.iloc[0]
        raise ValueError(
            f"scores table has {len(dup)} rows sharing (method, seed, task, task_version, metric), e.g. "
            f"{tuple(first[k] for k in key)}; keep one row per cell (re-run the sweep's table step)"
        )


def _fmt(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _paired_p(ours: pd.Series, base: pd.Series) -> tuple[float, str | None]:
    """Two-sided ttest_rel p over the seeds both have; (NaN, reason) when it is undefined."""
    common = ours.index.intersection(base.index)
    if len(common) < 2:
        return math.nan, f"{len(common)} paired seed(s)"
    diff = ours[common].to_numpy(float) - base[common].to_numpy(float)
    if np.allclose(diff, diff[0], rtol=0, atol=1e-12):
        return math.nan, "constant paired difference"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_rel(ours[common].to_numpy(float), base[common].to_numpy(float)).pvalue)
    return p, None


def wide_table(
    long: pd.DataFrame,
    baseline: str = "baseline",
    tasks: Sequence[str] | None = None,
    headline: Mapping[str, str] | None = None,
    digits: int = 3,
) -> pd.DataFrame:
    """The wide table (see the module docstring). `tasks` fixes the column order (default: order of first
    appearance); `headline` maps task -> metric (default `HEADLINE`)."""
    check_long(long)
    headline = {**HEADLINE, **(headline or {})}
    methods = list(dict.fromkeys(long["method"]))
    if baseline not in methods:
        raise ValueError(f"baseline method {baseline!r} has no scores; methods present: {methods}")
    methods = [baseline] + [m for m in methods if m != baseline]
    tasks = list(tasks) if tasks is not None else list(dict.fromkeys(long["task"]))
    no_headline = [t for t in tasks if t not in headline]
    if no_headline:
        raise ValueError(f"no headline metric for task(s) {no_headline}; pass headline={{task: metric}}")

    rows = {m: {"method": m, "notes": [], "git_revision": set(), "seeds": set()} for m in methods}
    columns: list[str] = ["method", "seeds"]
    for task in tasks:
        sel = long[(long["task"] == task) & (long["metric"] == headline[task])]
        versions = list(dict.fromkeys(sel["task_version"].astype(str)))
        if not versions:
            raise ValueError(f"no {headline[task]!r} scores for task {task!r} in the scores table")
        for version in versions:
            label = task if len(versions) == 1 else f"{task}@{version}"
            if len(versions) > 1:
                for row in rows.values():
                    row["notes"].append(f"{task}: {len(versions)} task versions, one column each")
            display = f"{label} [{PROTOCOLS.get(task, 'unknown protocol')}]"
            columns += [display] + [f"{label} {f}" for f in FIELDS]
            cell = sel[sel["task_version"].astype(str) == version]
            per_method = {m: g.set_index("seed")["value"].astype(float) for m, g in cell.groupby("method")}
            base = per_method.get(baseline, pd.Series(dtype=float))
            for m in methods:
                row = rows[m]
                values = per_method.get(m, pd.Series(dtype=float))
                mean = float(values.mean()) if len(values) else math.nan
                std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
                row[display] = _fmt(mean, std, digits)
                row[f"{label} mean"], row[f"{label} std"], row[f"{label} seeds"] = mean, std, len(values)
                row[f"{label} delta"] = mean - float(base.mean()) if len(base) and len(values) else math.nan
                if m == baseline or not len(values):
                    row[f"{label} p"] = math.nan
                else:
                    p, why = _paired_p(values, base)
                    row[f"{label} p"] = p
                    if why:
                        row["notes"].append(f"{label} p n/a: {why}")
                row["seeds"].update(int(s) for s in values.index)
                revisions = long.loc[(long["method"] == m) & (long["task"] == task), "git_revision"]
                row["git_revision"].update(str(r) for r in revisions)
    out = []
    for row in rows.values():
        row["seeds"] = " ".join(str(s) for s in sorted(row["seeds"]))
        row["notes"] = "; ".join(dict.fromkeys(row["notes"]))
        row["git_revision"] = " ".join(sorted(row["git_revision"]))
        out.append(row)
    return pd.DataFrame(out, columns=columns + ["notes", "git_revision"])


def write_wide_csv(wide: pd.DataFrame, path: str | Path) -> Path:
    """Write the wide table as CSV (floats to 6 significant digits, stable across platforms)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wide.to_csv(path, index=False, float_format="%.6g")
    return path


# ------------------------------------------------------------------------------------- tables to read

SIGNIFICANCE_MIN_SEEDS = 3  # paired seeds needed before a table marks a difference (two-sided paired t-test)
SIGNIFICANCE_TEST = "two-sided paired t-test over seeds (scipy.stats.ttest_rel)"


@dataclass(frozen=True)
class Display:
    """How a benchmark's headline metric reads in a table: `name`, `metric`, the factor applied to the
    stored value and the scale the header states."""

    name: str
    metric: str
    factor: float
    scale: str
    digits: int = 1
    short: str = ""  # the metric's label in the terminal table (default: metric)

    @property
    def header(self) -> str:
        return f"{self.name} {self.metric} ({self.scale})"


# Fractions (0-1) read as percentages; MMBench's circular accuracy is already x100; MME's perception score
# is points (per category accuracy + accuracy+ in %, summed over its perception categories).
DISPLAY: dict[str, Display] = {
    "vqav2": Display("VQAv2", "acc.", 100, "%"),
    "gqa": Display("GQA", "acc.", 100, "%"),
    "vizwiz": Display("VizWiz", "acc.", 100, "%"),
    "scienceqa_img": Display("SQA-IMG", "acc.", 100, "%"),
    "textvqa": Display("TextVQA", "acc.", 100, "%"),
    "chartqa": Display("ChartQA", "relaxed acc.", 100, "%", short="r.acc."),
    "docvqa": Display("DocVQA", "ANLS", 100, "%"),
    "pope": Display("POPE", "F1", 100, "%"),
    "mme": Display("MME", "perception", 1, "points", 0, short="perc."),
    "mmbench": Display("MMBench", "circular acc.", 1, "%", short="circ."),
}


def display_of(task: str) -> Display:
    """The Display of a task (by its benchmark); a task outside the registry shows its raw values."""
    from evals.tasks import TASKS

    info = TASKS.get(task)
    if info is not None and info.benchmark in DISPLAY:
        return DISPLAY[info.benchmark]
    return Display(task, HEADLINE.get(task, "value"), 1, "raw", 3)


@dataclass
class _Column:
    label: str  # the wide table's column label (task, or task@version)
    task: str
    display: Display


def _columns(wide: pd.DataFrame, tasks: Sequence[str]) -> list[_Column]:
    out = []
    for task in tasks:
        for col in wide.columns:
            if col.endswith(" mean") and (col == f"{task} mean" or col.startswith(f"{task}@")):
                out.append(_Column(col[: -len(" mean")], task, display_of(task)))
    return out


def _header(col: _Column) -> str:
    """The column's header; a task split by version (never averaged) names its version."""
    version = col.label[len(col.task) + 1 :] if col.label != col.task else ""
    return col.display.header + (f" @{version}" if version else "")


def _value(x: float, d: Display) -> str:
    return "–" if x is None or math.isnan(x) else f"{x * d.factor:.{d.digits}f}"


def _cell(row: pd.Series, col: _Column, sep: str = " ± ") -> str:
    d = col.display
    mean, std = row[f"{col.label} mean"], row[f"{col.label} std"]
    if math.isnan(mean):
        return "–"
    text = _value(mean, d)
    if not math.isnan(std):
        text += f"{sep}{std * d.factor:.{d.digits}f}"
    return text


def _delta(row: pd.Series, col: _Column, baseline_seeds: int) -> str:
    d = col.display
    delta = row[f"{col.label} delta"]
    if math.isnan(delta):
        return ""
    mark = ""
    p, n = row[f"{col.label} p"], min(int(row[f"{col.label} seeds"]), baseline_seeds)
    if n >= SIGNIFICANCE_MIN_SEEDS and not math.isnan(p):
        mark = "**" if p < 0.01 else "*" if p < 0.05 else ""
    return f"{delta * d.factor:+.{d.digits}f}{mark}"


def summary(
    long: pd.DataFrame,
    baseline: str = "baseline",
    tasks: Sequence[str] | None = None,
    reference: Mapping[str, Mapping[str, float]] | None = None,
) -> tuple[pd.DataFrame, list[_Column], dict[str, Mapping[str, float]]]:
    """The wide table plus what the readable renderings need. `reference`: extra rows {label: {task:
    value}} on the stored scale (e.g. the constant-answer scores of the mini suite's scoring check)."""
    tasks = list(tasks) if tasks is not None else list(dict.fromkeys(long["task"]))
    wide = wide_table(long, baseline=baseline, tasks=tasks)
    return wide, _columns(wide, tasks), dict(reference or {})


def _notes(wide: pd.DataFrame, cols: list[_Column], baseline: str, reference_labels: list[str]) -> list[str]:
    from evals.tasks import PROTOCOLS

    seeds = {m: s for m, s in zip(wide["method"], wide["seeds"])}
    base = set(str(seeds.get(baseline, "")).split())
    paired = {m: len(base & set(str(s).split())) for m, s in seeds.items() if m != baseline}
    untested = [f"{m}: {n}" for m, n in paired.items() if n < SIGNIFICANCE_MIN_SEEDS]
    if paired and len(untested) == len(paired):
        tested = f" (paired seeds here: {'; '.join(untested)}: no test)."
    elif untested:
        tested = f"; not tested for too few paired seeds: {'; '.join(untested)}."
    else:
        tested = "."
    lines = [
        f"Mean ± sample std over seeds ({'; '.join(f'{m}: {s}' for m, s in seeds.items())}); each column "
        "states its scale (fractions shown as %). (+x): difference of means to "
        f"{baseline}.",
        f"Significance: * p < 0.05, ** p < 0.01, {SIGNIFICANCE_TEST}, shown only with >= "
        f"{SIGNIFICANCE_MIN_SEEDS} paired seeds" + tested,
        "Protocols: "
        + "; ".join(
            f"{p}: "
            + ", ".join(
                f"{c.display.name} ({c.label})" for c in cols if PROTOCOLS.get(c.task, "unknown") == p
            )
            for p in dict.fromkeys(PROTOCOLS.get(c.task, "unknown") for c in cols)
        )
        + ".",
    ]
    if reference_labels:
        lines.append(
            f"{', '.join(reference_labels)}: the score of that fixed answer to every question, on the same "
            "data (stgc.data.scoring_check)."
        )
    return lines


def render_markdown(
    long: pd.DataFrame,
    baseline: str = "baseline",
    tasks: Sequence[str] | None = None,
    reference: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
    """table.md: one row per method (baseline first, then any reference rows), one column per benchmark's
    headline metric on its stated scale, "mean ± std (+delta)" per cell, and notes saying what they mean."""
    wide, cols, refs = summary(long, baseline, tasks, reference)
    base_seeds = len(str(wide.loc[wide["method"] == baseline, "seeds"].iloc[0]).split())
    header = ["method", "seeds"] + [_header(c) for c in cols]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * len(cols)]
    for _, row in wide.iterrows():
        cells = []
        for c in cols:
            cell = _cell(row, c)
            delta = _delta(row, c, base_seeds) if row["method"] != baseline else ""
            cells.append(f"{cell} ({delta})" if delta else cell)
        lines.append("| " + " | ".join([str(row["method"]), str(row["seeds"])] + cells) + " |")
    for label, values in refs.items():
        cells = [_value(values.get(c.task, math.nan), c.display) for c in cols]
        lines.append("| " + " | ".join([label, "–"] + cells) + " |")
    notes = _notes(wide, cols, baseline, list(refs))
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def render_text(
    long: pd.DataFrame,
    baseline: str = "baseline",
    tasks: Sequence[str] | None = None,
    reference: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
    """The same table for a terminal: aligned columns, two header lines (benchmark; metric and scale), the
    delta to the baseline on its own line under each method."""
    wide, cols, refs = summary(long, baseline, tasks, reference)
    base_seeds = len(str(wide.loc[wide["method"] == baseline, "seeds"].iloc[0]).split())
    rows: list[list[str]] = [
        ["", *[c.display.name + ("@" + c.label.split("@", 1)[1] if "@" in c.label else "") for c in cols]],
        ["", *[f"{c.display.short or c.display.metric} {c.display.scale}" for c in cols]],
    ]
    for _, row in wide.iterrows():
        rows.append([f"{row['method']} (seeds {row['seeds']})", *[_cell(row, c, "±") for c in cols]])
        if row["method"] != baseline:
            rows.append([f"  vs {baseline}", *[_delta(row, c, base_seeds) or "–" for c in cols]])
    for label, values in refs.items():
        rows.append([label, *[_value(values.get(c.task, math.nan), c.display) for c in cols]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        first = r[0].ljust(widths[0])
        out.append("  ".join([first, *(v.rjust(w) for v, w in zip(r[1:], widths[1:]))]).rstrip())
        if k == 1:
            out.append("-" * len(out[0]))
    notes = _notes(wide, cols, baseline, list(refs))
    return "\n".join(out) + "\n" + "\n".join(notes) + "\n"
