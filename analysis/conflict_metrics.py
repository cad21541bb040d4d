"""Gradient-conflict measurements: pure functions DataFrame -> tidy (long) DataFrame, like the routing ones
in ``analysis.metrics`` (which re-exports these).

Training curves: ``read_metrics_jsonl`` reads a run's ``metrics.jsonl`` into a long table, and
``conflict_curves`` / ``read_conflict_curves`` select and parse its ``conflict/<scope>/<stat>`` keys.
Checkpoint scores: ``conflict_summary`` and ``cosine_histogram`` summarise per-(token, expert) conflict-score
tables (``analysis.conflict_probe``).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.schema import require_columns

# ------------------------------------------------------------------------------------ conflict curves


def read_metrics_jsonl(
    path: str | Path, *, run: str | None = None, method: str | None = None
) -> pd.DataFrame:
    """Read a run's metrics.jsonl (one JSON object per logged step) into a long table.

    Columns: run, method, step, key, value (float). `run` defaults to the name of the file's folder;
    `method` comes from each record's "method" key, else from the argument, else missing. Every record
    needs an integer "step". Non-numeric values (and booleans) are not metrics and are left out. Blank
    lines are ignored; an unreadable last line (a run killed while writing) is skipped with a warning,
    an unreadable line elsewhere is an error.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(
            f"metrics file {path} does not exist; training writes it as runs/<run>/metrics.jsonl"
        )
    run = run if run is not None else path.parent.name
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if i == last:
                warnings.warn(f"{path}:{i + 1}: skipping truncated last line ({error})", stacklevel=2)
                continue
            raise ValueError(f"{path}:{i + 1} is not valid JSON ({error}); fix or remove the line") from error
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{i + 1} needs an object with an integer 'step'; got {line[:120]!r}")
        record_method = record.get("method", method)
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            rows.append((run, record_method, record["step"], key, float(value)))
    return pd.DataFrame(rows, columns=["run", "method", "step", "key", "value"])


_LAYER_TOKEN = re.compile(r"^(?:layers?[_-]?)?(\d+)$")


def conflict_curves(metrics: pd.DataFrame) -> pd.DataFrame:
    """Select and parse the conflict metrics of a long metrics table (from `read_metrics_jsonl`).

    Keys follow "conflict/<scope>/<stat>" with <scope> a layer ("layer3", "layer_3", "3") or another scope
    ("all", "mean"), and <stat> anything, may contain "/" (e.g. "fraction", "mean_cos",
    "expert2/fraction"); "conflict/<stat>" has no scope. Columns: run, method, step, layer (nullable int,
    missing when the scope is not a layer), scope (raw text), stat, value.
    """
    require_columns(metrics, ["run", "method", "step", "key", "value"], "conflict_curves")
    table = metrics[metrics["key"].str.startswith("conflict/")].copy()
    parts = table["key"].str.split("/")
    has_scope = parts.str.len() >= 3
    table["scope"] = np.where(has_scope, parts.str[1], "")
    table["stat"] = np.where(has_scope, parts.str[2:].str.join("/"), parts.str[1:].str.join("/"))
    layer = table["scope"].str.extract(_LAYER_TOKEN, expand=False)
    table["layer"] = pd.to_numeric(layer, errors="coerce").astype("Int64")
    columns = ["run", "method", "step", "layer", "scope", "stat", "value"]
    return table[columns].sort_values(["run", "stat", "layer", "step"], ignore_index=True)


def read_conflict_curves(
    paths: Sequence[str | Path],
    *,
    runs: Sequence[str] | None = None,
    methods: Sequence[str | None] | None = None,
) -> pd.DataFrame:
    """`conflict_curves` of several metrics.jsonl files concatenated (runs / methods name them if given)."""
    if runs is not None and len(runs) != len(paths):
        raise ValueError(f"got {len(runs)} run names for {len(paths)} metrics files; give one per file")
    if methods is not None and len(methods) != len(paths):
        raise ValueError(f"got {len(methods)} methods for {len(paths)} metrics files; give one per file")
    tables = [
        conflict_curves(
            read_metrics_jsonl(
                path,
                run=runs[i] if runs is not None else None,
                method=methods[i] if methods is not None else None,
            )
        )
        for i, path in enumerate(paths)
    ]
    return pd.concat(tables, ignore_index=True)


# ------------------------------------------------------------------------------------ conflict scores


def _considered(scores: pd.DataFrame) -> pd.DataFrame:
    """Rows that entered the conflict test: all, or those with considered == True when that column exists
    (stgc.conflict keeps a `considered_A` mask: assignments of padding tokens or of experts with too few
    tokens have a score but no conflict decision)."""
    if "considered" not in scores.columns:
        return scores
    if scores["considered"].dtype != bool:
        raise ValueError(f"`considered` must be a boolean column, got dtype {scores['considered'].dtype}")
    return scores[scores["considered"]]


def conflict_summary(scores: pd.DataFrame, *, by: Sequence[str] = ("layer",)) -> pd.DataFrame:
    """Per-group summary of per-(token, expert) conflict scores (columns `score` (a cosine) and `conflict`).

    conflict_fraction = mean of the boolean `conflict`; mean/std/median of `score`; n_scores = rows.
    With a boolean `considered` column, only considered rows count.
    """
    by = list(by)
    require_columns(scores, [*by, "score", "conflict"], "conflict_summary")
    scores = _considered(scores)
    if scores["conflict"].dtype != bool:
        raise ValueError(f"`conflict` must be a boolean column, got dtype {scores['conflict'].dtype}")
    return (
        scores.groupby(by, sort=True)
        .agg(
            n_scores=("score", "size"),
            conflict_fraction=("conflict", "mean"),
            mean_score=("score", "mean"),
            std_score=("score", "std"),
            median_score=("score", "median"),
        )
        .reset_index()
    )


def cosine_histogram(
    scores: pd.DataFrame,
    *,
    by: Sequence[str] = ("layer",),
    bins: int = 40,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> pd.DataFrame:
    """Histogram of `score` per group; columns *by, bin_left, bin_right, bin_center, count, fraction, density.

    fraction = count / n (sums to 1 per group); density = fraction / bin width (integrates to 1). Scores
    outside `value_range` by more than 1e-4 (float rounding of a cosine) are an error, not clipped. With a
    boolean `considered` column, only considered rows count.
    """
    by = list(by)
    require_columns(scores, [*by, "score"], "cosine_histogram")
    scores = _considered(scores)
    if bins < 1:
        raise ValueError(f"bins={bins} must be >= 1")
    low, high = value_range
    values = scores["score"].to_numpy(np.float64)
    if values.size and (values.min() < low - 1e-4 or values.max() > high + 1e-4 or np.isnan(values).any()):
        raise ValueError(
            f"scores span [{np.nanmin(values)}, {np.nanmax(values)}] (NaN: {np.isnan(values).any()}), "
            f"outside value_range={value_range}; pass a wider value_range or check the scores"
        )
    edges = np.linspace(low, high, bins + 1)
    rows = []
    for key, group in scores.groupby(by, sort=True) if by else [((), scores)]:
        key = key if isinstance(key, tuple) else (key,)
        counts, _ = np.histogram(np.clip(group["score"].to_numpy(np.float64), low, high), bins=edges)
        fraction = counts / max(counts.sum(), 1)
        for i in range(bins):
            width = edges[i + 1] - edges[i]
            center = (edges[i] + edges[i + 1]) / 2
            rows.append(
                (*key, edges[i], edges[i + 1], center, int(counts[i]), fraction[i], fraction[i] / width)
            )
    columns = [*by, "bin_left", "bin_right", "bin_center", "count", "fraction", "density"]
    return pd.DataFrame(rows, columns=columns)
