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
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from analysis import figures as F
from analysis import metrics as M
from analysis.results import ResultsFolder, checkpoint_labels, find_runs, load_scores, open_results
from analysis.schema import read_trace_meta, read_traces
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

MISSING = "**Missing input:**"


# --------------------------------------------------------------------------------------------------------
# the section object


@dataclasses.dataclass
class Section:
    """Notes, tables and figures of one notebook, in display order; tables and figures are written to disk
    when added."""

    title: str
    folder: ResultsFolder
    items: list[tuple[str, Any]] = dataclasses.field(default_factory=list)

    def note(self, text: str) -> None:
        self.items.append(("note", text))

    def missing(self, text: str) -> None:
        self.items.append(("note", f"{MISSING} {text}"))

    def table(self, name: str, table: pd.DataFrame, caption: str) -> pd.DataFrame:
        path = self.folder.tables_dir / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(path, index=False, float_format="%.6g")
        self.items.append(("table", (caption, table, path)))
        return table

    def figure(self, name: str, fig, caption: str) -> Path:
        path = F.save_figure(fig, self.folder.figures_dir / f"{name}.png")
        self.items.append(("figure", (caption, path)))
        return path

    @property
    def figure_paths(self) -> list[Path]:
        return [value[1] for kind, value in self.items if kind == "figure"]

    @property
    def notes(self) -> list[str]:
        return [value for kind, value in self.items if kind == "note"]

    def show(self) -> None:
        """Display every item (in a notebook: Markdown, HTML tables, the saved PNGs)."""
        from IPython.display import Image, Markdown, display

        display(Markdown(f"## {self.title}\nResults folder: `{self.folder.path}`"))
        for kind, value in self.items:
            if kind == "note":
                display(Markdown(value))
            elif kind == "table":
                caption, table, path = value
                display(Markdown(f"**{caption}** (`{path.name}`)"))
                with pd.option_context(
                    "display.precision", 3, "display.max_columns", 60, "display.width", 200
                ):
                    display(table)
            else:
                caption, path = value
                display(Markdown(f"**{caption}** (`{path.name}`)"))
                display(Image(filename=str(path)))

    def __repr__(self) -> str:
        counts = {k: sum(1 for kind, _ in self.items if kind == k) for k in ("note", "table", "figure")}
        return f"Section({self.title!r}, {counts})"


def _slug(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "x"


def mean_over_seeds(table: pd.DataFrame, keys: Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """Mean and sample std (ddof=1; NaN with one seed) of `values` over the rows of each `keys` group, with
    n_seeds = number of rows (one per checkpoint)."""
    grouped = table.groupby(list(keys), sort=True, dropna=False)
    out = grouped.size().rename("n_seeds").reset_index()
    for value in values:
        stats = grouped[value].agg(["mean", "std"]).reset_index(drop=True)
        out[f"{value}_mean"], out[f"{value}_std"] = stats["mean"].to_numpy(), stats["std"].to_numpy()
    return out


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
# traces: 02 expert loading, 03 pathways, `stgc analyze routing`


@dataclasses.dataclass(frozen=True)
class TraceFile:
    path: Path
    meta: dict[str, Any]
    method: str  # the sweep's label of the checkpoint when scores.csv names it, else the routing method
    seed: int | None


def trace_files(
    paths: Sequence[str | Path], labels: dict[str, tuple[str, int | None]] | None = None
) -> list[TraceFile]:
    """Trace files with their metadata (only the footer is read); `labels` maps checkpoint paths to the
    sweep's (method, seed)."""
    out = []
    for path in paths:
        meta = read_trace_meta(path)
        method, seed = (labels or {}).get(
            str(Path(meta["checkpoint"]).resolve()), (meta["method"], meta["seed"])
        )
        out.append(TraceFile(Path(path), meta, str(method), seed if seed is not None else meta["seed"]))
    return out


def _identify(table: pd.DataFrame, trace: TraceFile) -> pd.DataFrame:
    table.insert(0, "method", trace.method)
    table.insert(1, "seed", pd.array([trace.seed] * len(table), dtype="Int64"))
    table.insert(2, "trace", trace.path.name)
    return table


TRACE_TABLES = ("expert_loading", "routing_stats", "pathways", "top_paths", "nmi_task", "nmi_modality")


def file_tables(
    trace: TraceFile, kinds: Sequence[str] = TRACE_TABLES, top_n: int = 10
) -> dict[str, pd.DataFrame]:
    """The metric tables of one trace file (one checkpoint), each with method, seed, trace columns."""
    unknown = sorted(set(kinds) - set(TRACE_TABLES))
    if unknown:
        raise ValueError(f"unknown trace tables {unknown}; choose from {list(TRACE_TABLES)}")
    needs_probs = "routing_stats" in kinds
    columns = None if needs_probs else ["sample_id", "task", "position", "modality", "layer", "topk_experts"]
    df, meta = read_traces(trace.path, columns=columns)
    E = int(meta["num_experts"])
    out: dict[str, pd.DataFrame] = {}
    if "expert_loading" in kinds:
        out["expert_loading"] = M.expert_loading(df, E, by=("task",))
    if "routing_stats" in kinds:
        out["routing_stats"] = M.routing_stats(df, by=("task",), num_experts=E)
    if "pathways" in kinds:
        out["pathways"] = M.pathways(df, top_n, by=("task",))
    if "top_paths" in kinds:
        out["top_paths"] = M.top_paths(df, top_n, by=("task",))
    if "nmi_task" in kinds:
        out["nmi_task"] = M.nmi(df, "task")
    if "nmi_modality" in kinds:
        out["nmi_modality"] = M.nmi(df, "modality", by=("task",))
    return {name: _identify(table, trace) for name, table in out.items()}


def routing_tables(
    paths: Sequence[str | Path],
    *,
    kinds: Sequence[str] = TRACE_TABLES,
    top_n: int = 10,
    labels: dict[str, tuple[str, int | None]] | None = None,
) -> dict[str, pd.DataFrame]:
    """The metric tables of several trace files, concatenated (one file = one checkpoint)."""
    per_file = [file_tables(trace, kinds, top_n) for trace in trace_files(paths, labels)]
    return {kind: pd.concat([t[kind] for t in per_file], ignore_index=True) for kind in kinds}


def write_routing_tables(
    paths: Sequence[str | Path], out_dir: str | Path, *, top_n: int = 10, overwrite: bool = False
) -> list[Path]:
    """`stgc analyze routing`: every table of `routing_tables` as <out_dir>/<name>.csv (refuses to replace
    existing CSVs unless `overwrite`)."""
    out_dir = Path(out_dir)
    targets = {kind: out_dir / f"{kind}.csv" for kind in TRACE_TABLES}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"{', '.join(existing)} already exist; pass --overwrite to replace them")
    tables = routing_tables(paths, top_n=top_n)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, table in tables.items():
        table.to_csv(targets[kind], index=False, float_format="%.6g")
        written.append(targets[kind])
    return written


def modality_gap(loading: pd.DataFrame, selection: str = "topk") -> pd.DataFrame:
    """How differently image and text tokens load the experts, per (method, seed, task, layer):
    total variation distance TV = 1/2 sum_e |s_image(e) - s_text(e)| of the within-modality shares
    (`share_in_modality`); 0 = same distribution, 1 = disjoint experts. NaN-free: groups without both
    modalities are left out."""
    keys = [c for c in ("method", "seed", "trace", "task") if c in loading.columns] + ["layer"]
    rows = loading[(loading["selection"] == selection) & loading["modality"].isin(["image", "text"])]
    wide = rows.pivot_table(index=[*keys, "expert"], columns="modality", values="share_in_modality")
    wide = wide.dropna()
    if wide.empty or not {"image", "text"} <= set(wide.columns):
        return pd.DataFrame(columns=[*keys, "image_text_tv"])
    tv = (wide["image"] - wide["text"]).abs().groupby(level=list(range(len(keys)))).sum() / 2
    return tv.rename("image_text_tv").reset_index()


def _chosen(traces: list[TraceFile], seed: int | None) -> list[TraceFile]:
    """One trace per method: the requested seed, else the smallest seed present."""
    out = []
    for method in dict.fromkeys(t.method for t in traces):
        mine = [t for t in traces if t.method == method]
        match = [t for t in mine if seed is not None and t.seed == seed]
        out.append(match[0] if match else min(mine, key=lambda t: (t.seed is None, t.seed or 0, t.path.name)))
    return out


def _say_chosen(section: Section, traces: list[TraceFile], chosen: set[Path]) -> None:
    if len(chosen) < len(traces):
        shown = ", ".join(f"{t.method} seed {t.seed}" for t in traces if t.path in chosen)
        section.note(
            f"Per-expert figures show one checkpoint per method ({shown}): expert ids are not comparable "
            "between training runs. The tables average over all checkpoints."
        )


def _open_traces(section: Section, what: str) -> list[TraceFile]:
    folder = section.folder
    paths = folder.trace_files()
    if not paths:
        section.missing(
            f"no routing traces under `{folder.routing_dir}`, so no {what}. Capture them with `stgc analyze "
            f"capture <checkpoint> --tasks stgc_scienceqa_img stgc_textvqa_val stgc_mmbench_en_dev_static "
            f"--out {folder.routing_dir}/<method>-seed<seed>.parquet`."
        )
        return []
    traces = trace_files(paths, checkpoint_labels(folder))
    listing = pd.DataFrame(
        [
            {
                "trace": t.path.name,
                "method": t.method,
                "seed": t.seed,
                "experts": t.meta["num_experts"],
                "top_k": t.meta["top_k"],
                "moe_layers": " ".join(str(i) for i in t.meta["moe_layers"]),
                "tasks": " ".join(t.meta.get("tasks", [])),
                "checkpoint": t.meta["checkpoint"],
            }
            for t in traces
        ]
    )
    section.table("trace_files", listing, "Routing traces (one file per checkpoint)")
    return traces


def _tasks_of(table: pd.DataFrame, tasks: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(table["task"]))
    return [t for t in present if tasks is None or t in tasks]


def expert_loading(
    results_dir: str | Path | None = None, *, seed: int | None = None, tasks: Sequence[str] | None = None
) -> Section:
    """02: expert loading per MoE layer, image vs text tokens; balance (no collapse) and specialisation."""
    folder = open_results(results_dir)
    section = Section("Expert loading", folder)
    traces = _open_traces(section, "expert-loading figures")
    if not traces:
        return section
    chosen = {t.path for t in _chosen(traces, seed)}
    _say_chosen(section, traces, chosen)
    loadings, stats, nmi_task, nmi_modality = [], [], [], []
    for trace in traces:
        tables = file_tables(trace, ("expert_loading", "routing_stats", "nmi_task", "nmi_modality"))
        loadings.append(tables["expert_loading"])
        stats.append(tables["routing_stats"])
        nmi_task.append(tables["nmi_task"])
        nmi_modality.append(tables["nmi_modality"])
        if trace.path not in chosen:
            continue
        loading = tables["expert_loading"]
        for task in _tasks_of(loading, tasks):
            fig = F.plot_expert_loading(loading, task=task, selection="topk", normalise="modality")
            fig.suptitle(f"{trace.method} (seed {trace.seed}) | {fig.get_suptitle()}")
            section.figure(
                f"expert_loading_{_slug(trace.method)}_seed{trace.seed}_{_slug(task)}",
                fig,
                f"{trace.method}, seed {trace.seed}, {task}",
            )
    stats = pd.concat(stats, ignore_index=True)
    balance = mean_over_seeds(
        stats,
        ["method", "task", "layer"],
        ["top1_max_over_mean", "top1_cv", "n_unused_experts", "top1_min_share", "mean_entropy_normalised"],
    )
    section.table(
        "routing_balance",
        balance,
        "Load balance (top-1 counts: max/mean 1 = balanced, E = collapsed; unused experts) and normalised "
        "routing entropy, mean/std over seeds",
    )
    gap = modality_gap(pd.concat(loadings, ignore_index=True))
    if len(gap):
        section.table(
            "modality_gap",
            mean_over_seeds(gap, ["method", "task", "layer"], ["image_text_tv"]),
            "Image vs text loading: total variation distance of the within-modality expert shares (0 = same)",
        )
    else:
        section.missing("no task has both image and text tokens in the traces, so no image/text comparison.")
    section.table(
        "nmi_modality",
        mean_over_seeds(pd.concat(nmi_modality, ignore_index=True), ["method", "task", "layer"], ["nmi"]),
        "Normalised mutual information between a token's top-1 expert and its modality",
    )
    nmi_t = pd.concat(nmi_task, ignore_index=True)
    if (nmi_t["n_labels"] > 1).any():
        section.table(
            "nmi_task",
            mean_over_seeds(nmi_t, ["method", "layer"], ["nmi"]),
            "Normalised mutual information between a token's top-1 expert and its task (benchmark)",
        )
    return section


def pathways(
    results_dir: str | Path | None = None,
    *,
    seed: int | None = None,
    tasks: Sequence[str] | None = None,
    top_n: int = 10,
    modality: str = "all",
) -> Section:
    """03: activated pathways (each token's top-1 expert per MoE layer): the top paths and how concentrated
    the paths are (entropy, number of distinct paths, coverage of the top N)."""
    folder = open_results(results_dir)
    section = Section("Activated pathways", folder)
    traces = _open_traces(section, "pathway figures")
    if not traces:
        return section
    chosen = {t.path for t in _chosen(traces, seed)}
    _say_chosen(section, traces, chosen)
    stats = []
    for trace in traces:
        tables = file_tables(trace, ("pathways", "top_paths"), top_n=top_n)
        stats.append(tables["pathways"])
        if trace.path not in chosen:
            continue
        top = tables["top_paths"]
        for task in _tasks_of(top, tasks):
            fig = F.plot_pathways(top, task=task, modality=modality, num_experts=trace.meta["num_experts"])
            fig.suptitle(f"{trace.method} (seed {trace.seed}) | {fig.get_suptitle()}")
            section.figure(
                f"pathways_{_slug(trace.method)}_seed{trace.seed}_{_slug(task)}",
                fig,
                f"{trace.method}, seed {trace.seed}, {task}: top {top_n} paths",
            )
        shown = top[top["modality"] == modality].drop(columns=["path", "layers"])
        section.table(
            f"top_paths_{_slug(trace.method)}_seed{trace.seed}",
            shown,
            f"Top {top_n} paths of {trace.method}, seed {trace.seed} ({modality} tokens)",
        )
    stats = pd.concat(stats, ignore_index=True)
    section.table(
        "pathway_stats",
        mean_over_seeds(
            stats,
            ["method", "task", "modality"],
            ["n_tokens", "n_distinct_paths", "path_entropy", "top_n_coverage"],
        ),
        f"Path statistics per modality, mean/std over seeds (entropy in nats; share of tokens on the top "
        f"{top_n} paths)",
    )
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
