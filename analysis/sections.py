"""The report's sections: one function per notebook, holding every computation the notebook shows.

    notebooks/01_benchmarks.ipynb        benchmarks(results_dir)
    notebooks/02_expert_loading.ipynb    expert_loading(results_dir)
    notebooks/03_pathways.ipynb          pathways(results_dir)
    notebooks/04_gradient_conflict.ipynb gradient_conflict(results_dir, runs_dir)

A section function reads the results folder (`analysis.results`), computes tables with `analysis.metrics`,
draws figures with `analysis.figures`, writes them (PNG under <results>/reports/figures/, CSV under
<results>/reports/tables/) and returns a `Section`, which the notebook displays with `.show()`. A missing
input becomes a visible "missing input" note, never an empty cell; a results folder without scores.csv is
an error (`analysis.results.ResultsError`). `FIGURES` maps every figure to the function and data that make
it (docs/architecture.md, Conventions); `stgc report` writes it into reports/README.md.

Expert ids are arbitrary per training run (every expert is upcycled from the same dense FFN; only the
router's random init tells them apart), so per-expert figures show one checkpoint (one seed per method),
while permutation-invariant statistics (balance, entropy, path coverage, NMI, conflict) are averaged over
seeds.

`routing_tables` is also `stgc analyze routing`: the metric tables of trace files as CSVs.

The ``Section`` object and its helpers are in `analysis.report_section`, the routing-trace sections (02, 03,
`routing_tables`) in `analysis.sections_routing`; every name is importable from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from analysis import figures as F
from analysis import metrics as M
from analysis.report_section import MISSING, Section, mean_over_seeds
from analysis.results import ResultsFolder, checkpoint_labels, find_runs, load_scores, open_results
from analysis.sections_routing import (
    TRACE_TABLES,
    TraceFile,
    expert_loading,
    file_tables,
    modality_gap,
    pathways,
    routing_tables,
    trace_files,
    write_routing_tables,
)
from stgc.paths import portable


@dataclasses.dataclass(frozen=True)
class FigureInfo:
    section: str  # notebook
    plot: str  # analysis.figures function
    compute: str  # analysis.metrics call that makes its table
    data: str  # input under the results folder


FIGURES: dict[str, FigureInfo] = {
    "benchmarks.png": FigureInfo(
        "01_benchmarks",
        "figures.plot_benchmark_comparison",
        "sections.headline_scores(scores.csv): each task's headline metric (evals.tasks.HEADLINE)",
        "scores.csv",
    ),
    "expert_loading_<method>_seed<seed>_<task>.png": FigureInfo(
        "02_expert_loading",
        "figures.plot_expert_loading(selection='topk', normalise='modality')",
        "metrics.expert_loading(trace, num_experts, by=('task',))",
        "routing/<checkpoint>.parquet",
    ),
    "pathways_<method>_seed<seed>_<task>.png": FigureInfo(
        "03_pathways",
        "figures.plot_pathways(modality='all')",
        "metrics.top_paths(trace, top_n, by=('task',))",
        "routing/<checkpoint>.parquet",
    ),
    "conflict_curves.png": FigureInfo(
        "04_gradient_conflict",
        "figures.plot_conflict_curves (mean over MoE layers)",
        "metrics.read_conflict_curves(<run>/metrics.jsonl of every run)",
        "runs' metrics.jsonl (analysis.results.find_runs)",
    ),
    "cosine_histograms.png": FigureInfo(
        "04_gradient_conflict",
        "figures.plot_cosine_histograms(hue='method')",
        "metrics.cosine_histogram(scores, by=('method', 'layer'))",
        "conflict/*.parquet",
    ),
}
TABLES: dict[str, str] = {
    "benchmark_table.csv": "table.csv, display columns (mean ± std over seeds) [01]",
    "benchmark_deltas.csv": "table.csv, delta vs baseline and paired-test p per task [01]",
    "provenance.csv": "scores.csv: seeds, checkpoints, task versions, git revisions, dates per method [01]",
    "trace_files.csv": "the trace files' metadata (analysis.schema.read_trace_meta) [02, 03]",
    "routing_balance.csv": "metrics.routing_stats per checkpoint, mean/std over seeds [02]",
    "modality_gap.csv": "sections.modality_gap(metrics.expert_loading), mean/std over seeds [02]",
    "nmi_modality.csv": "metrics.nmi(trace, 'modality', by=('task',)), mean/std over seeds [02]",
    "nmi_task.csv": "metrics.nmi(trace, 'task'), mean/std over seeds [02]",
    "pathway_stats.csv": "metrics.pathways(trace, top_n, by=('task',)), mean/std over seeds [03]",
    "top_paths_<method>_seed<seed>.csv": "metrics.top_paths of the checkpoint drawn [03]",
    "conflict_runs.csv": "analysis.results.find_runs [04]",
    "conflict_final.csv": "metrics.conflict_curves at each run's last measured step, mean/std over runs [04]",
    "conflict_scores_summary.csv": "metrics.conflict_summary(scores, by=('method', 'layer')) [04]",
    "conflict_by_modality.csv": "metrics.conflict_summary(scores, by=('method', 'modality')) [04]",
}


# --------------------------------------------------------------------------------------------------------
# 01 benchmarks


def headline_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """The rows of each task's headline metric (evals.tasks.HEADLINE; every metric of a task without one);
    a task evaluated under several task versions becomes one "task@version" per version."""
    from evals.tasks import HEADLINE

    keep = scores[[HEADLINE.get(t, m) == m for t, m in zip(scores["task"], scores["metric"])]].copy()
    versions = keep.groupby("task")["task_version"].transform("nunique")
    keep["task"] = np.where(versions > 1, keep["task"] + "@" + keep["task_version"].astype(str), keep["task"])
    return keep.reset_index(drop=True)


def _baseline(folder: ResultsFolder, methods: Sequence[str]) -> str | None:
    import json

    if folder.sweep_json.is_file():
        baseline = json.loads(folder.sweep_json.read_text()).get("baseline")
        if baseline in methods:
            return baseline
    return "baseline" if "baseline" in methods else None


def benchmarks(results_dir: str | Path | None = None) -> Section:
    """01: the wide benchmark table (table.csv), deltas vs the baseline, and per-benchmark bars with error
    bars across seeds."""
    folder = open_results(results_dir)
    section = Section("Benchmarks", folder)
    scores = load_scores(folder)
    if scores.empty:
        section.missing(f"{folder.scores_csv} has no rows yet: the sweep has not finished a cell.")
        return section
    methods = list(dict.fromkeys(scores["method"]))
    baseline = _baseline(folder, methods)
    seeds = scores.groupby("method")["seed"].apply(
        lambda s: " ".join(str(int(x)) for x in sorted(s.unique()))
    )
    section.note(
        f"`scores.csv`: {len(scores)} scores, {scores['task'].nunique()} tasks; methods (seeds): "
        + ", ".join(f"{m} ({seeds[m]})" for m in methods)
        + (f"; baseline: {baseline}" if baseline else "; no baseline method in the scores")
    )
    if folder.table_csv.is_file():
        wide = pd.read_csv(folder.table_csv)
        source = "table.csv"
    elif baseline is not None:
        from evals.tables import wide_table

        section.missing(f"{folder.table_csv} is missing; the table below is rebuilt from scores.csv.")
        tasks = [t for t in dict.fromkeys(scores["task"])]
        wide = wide_table(scores, baseline=baseline, tasks=tasks)
        source = "scores.csv (evals.tables.wide_table)"
    else:
        section.missing(
            f"{folder.table_csv} is missing and no baseline method to rebuild it from scores.csv."
        )
        wide = None
    if wide is not None:
        display_cols = [c for c in wide.columns if c.endswith("]")]
        section.table(
            "benchmark_table",
            wide[["method", "seeds", *display_cols]],
            f"Headline metric per benchmark, mean ± std over seeds (from {source})",
        )
        delta_cols = [c for c in wide.columns if c.endswith(" delta") or c.endswith(" p")]
        if delta_cols:
            deltas = wide[["method", *delta_cols]]
            if baseline is not None:
                deltas = deltas[deltas["method"] != baseline]
            section.table(
                "benchmark_deltas",
                deltas,
                f"Difference to {baseline or 'the baseline'} (mean over seeds), paired t-test p over seeds",
            )
        notes = [n for n in wide.get("notes", pd.Series(dtype=str)).dropna().unique() if str(n).strip()]
        for n in notes:
            section.note(f"Table note: {n}")
    headline = headline_scores(scores)
    order = ([baseline] if baseline else []) + [m for m in methods if m != baseline]
    fig = F.plot_benchmark_comparison(headline, method_order=order)
    section.figure(
        "benchmarks", fig, "Headline metric per benchmark: bar = mean, error bar = ±1 s.d. over seeds"
    )
    provenance = (
        scores.groupby("method", sort=False)
        .agg(
            seeds=("seed", lambda s: " ".join(str(int(x)) for x in sorted(s.unique()))),
            checkpoints=("checkpoint", "nunique"),
            task_versions=("task_version", lambda s: " ".join(sorted(s.astype(str).unique()))),
            git_revisions=("git_revision", lambda s: " ".join(sorted(s.astype(str).unique()))),
            first_date=("date", "min"),
            last_date=("date", "max"),
        )
        .reset_index()
    )
    section.table("provenance", provenance, "Provenance of the scores")
    return section


# --------------------------------------------------------------------------------------------------------
# 04 gradient conflict


def bin_steps(curves: pd.DataFrame, bins: int = 40) -> tuple[pd.DataFrame, int]:
    """Curves averaged within step bins of width W = ceil(max step / bins), per (run, method, layer, scope,
    stat); `step` becomes the bin centre. Returns (binned curves, W). Runs measured at different intervals
    (STGC every step, the baseline every few) then contribute one point per bin each, and a 250-step run
    draws as ~40 points instead of 250 noisy ones. W = 1 leaves the curves unchanged."""
    if bins < 1:
        raise ValueError(f"bins={bins} must be >= 1")
    width = max(1, int(np.ceil(curves["step"].max() / bins))) if len(curves) else 1
    if width == 1:
        return curves, 1
    binned = curves.assign(step=(curves["step"] - 1) // width * width + (width + 1) / 2)
    keys = ["run", "method", "layer", "scope", "stat", "step"]
    return binned.groupby(keys, dropna=False, sort=True)["value"].mean().reset_index(), width


def _final_values(curves: pd.DataFrame) -> pd.DataFrame:
    """Each run's value of every (layer, stat) at its last measured step."""
    per_layer = curves[curves["layer"].notna()]
    last = per_layer.sort_values("step").groupby(["run", "method", "layer", "stat"], dropna=False).tail(1)
    return last.reset_index(drop=True)


def gradient_conflict(results_dir: str | Path | None = None, runs_dir: str | Path | None = None) -> Section:
    """04: conflict fraction and gradient consistency over training (runs' metrics.jsonl), and the cosine
    distribution of checkpoints (conflict/*.parquet)."""
    from analysis.conflict_probe import read_conflict_scores

    folder = open_results(results_dir, runs_dir)
    section = Section("Token gradient conflict", folder)

    runs = find_runs(folder)
    if runs.empty:
        section.missing(
            "no training runs found (no runs.json or sweep.json, and no checkpoint paths in scores.csv that "
            "lead to a metrics.jsonl); pass the runs folder (`stgc report --runs-dir runs/<sweep>`)."
        )
    else:
        shown = runs.assign(metrics=runs["metrics"].map(portable))  # no machine-specific prefix in tables
        section.table("conflict_runs", shown, "Training runs read for the curves")
        absent = runs[~runs["exists"].astype(bool)]
        for row in absent.itertuples():
            section.missing(f"run {row.run} ({row.found_by}) has no metrics.jsonl at `{row.metrics}`.")
        present = runs[runs["exists"].astype(bool)]
        curves = (
            M.read_conflict_curves(
                present["metrics"].tolist(),
                runs=present["run"].tolist(),
                methods=[None if pd.isna(m) else m for m in present["method"]],
            )
            if len(present)
            else pd.DataFrame()
        )
        if curves.empty or not {"fraction", "mean_cos"} <= set(curves.loc[curves["layer"].notna(), "stat"]):
            section.missing(
                "the runs' metrics.jsonl hold no per-layer conflict/layer<i>/fraction and mean_cos keys "
                "(the trainer logs them on steps with token gradients)."
            )
        else:
            quiet = sorted(set(present["run"]) - set(curves["run"]))
            if quiet:
                section.note(f"Runs without conflict measurements: {', '.join(quiet)}.")
            binned, width = bin_steps(curves[curves["stat"].isin(["fraction", "mean_cos"])])
            fig = F.plot_conflict_curves(binned, stats=("fraction", "mean_cos"))
            for ax in fig.axes:  # optimizer steps are integers (matplotlib would tick 2.5, 5.0, ...)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            smoothing = f"; each point: mean over a bin of {width} steps" if width > 1 else ""
            section.figure(
                "conflict_curves",
                fig,
                f"Conflicting-token fraction and gradient consistency during training{smoothing}",
            )
            final = _final_values(curves[curves["stat"].isin(["fraction", "mean_cos"])])
            summary = mean_over_seeds(final, ["method", "layer", "stat"], ["value"])
            keys = ["method", "layer", "stat"]
            summary = summary.merge(
                final.groupby(keys)["step"].max().rename("last_step").reset_index(), on=keys
            )
            section.table(
                "conflict_final",
                summary,
                "Conflict statistics at each run's last measured step, mean/std over runs",
            )

    files = folder.conflict_files()
    if not files:
        section.missing(
            f"no conflict score files under `{folder.conflict_dir}`, so no cosine distribution. Write them "
            "with `stgc analyze conflict <checkpoint> --data data/mini/train --out "
            f"{folder.conflict_dir}/<method>-seed<seed>.parquet`."
        )
        return section
    scores = read_conflict_scores(files)
    labels = checkpoint_labels(folder)
    mapped = scores["checkpoint"].map(lambda c: labels.get(str(Path(c).resolve()), (None, None))[0])
    scores["method"] = mapped.fillna(scores["method"])
    hist = M.cosine_histogram(scores, by=("method", "layer"))
    fig = F.plot_cosine_histograms(hist, hue="method")
    section.figure("cosine_histograms", fig, "Cosine of token gradients to their expert's mean gradient")
    section.table(
        "conflict_scores_summary",
        M.conflict_summary(scores, by=("method", "seed", "layer")),
        "Conflict scores of the checkpoints (considered assignments)",
    )
    section.table(
        "conflict_by_modality",
        M.conflict_summary(scores, by=("method", "modality")),
        "Conflicts by token modality (all layers and seeds pooled)",
    )
    return section


__all__ = [
    "FIGURES",
    "FigureInfo",
    "MISSING",
    "Section",
    "TABLES",
    "TRACE_TABLES",
    "TraceFile",
    "benchmarks",
    "bin_steps",
    "expert_loading",
    "file_tables",
    "gradient_conflict",
    "headline_scores",
    "mean_over_seeds",
    "modality_gap",
    "pathways",
    "routing_tables",
    "trace_files",
    "write_routing_tables",
]
