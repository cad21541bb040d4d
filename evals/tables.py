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
are never averaged together (STYLE.md 9): a task with several versions gets one column per version and a
note says so.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
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
