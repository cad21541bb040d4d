"""The routing-trace sections of the report: 02 expert loading and 03 pathways (``expert_loading``,
``pathways``), and ``routing_tables`` / ``write_routing_tables`` (``stgc analyze routing``: the metric tables
of trace files as CSVs), with the trace files they read (``trace_files``). ``analysis.sections`` re-exports
them with the other sections."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from analysis import figures as F
from analysis import metrics as M
from analysis.report_section import Section, _slug, mean_over_seeds
from analysis.results import checkpoint_labels, open_results
from analysis.schema import read_trace_meta, read_traces


@dataclasses.dataclass(frozen=True)
class TraceFile:
    path: Path
    meta: dict[str, Any]
    method: str  # the sweep's label of the checkpoint when scores.csv names it, else the routing method
    seed: int | None
    checkpoint: Path  # the traced checkpoint's folder, resolved


def trace_files(
    paths: Sequence[str | Path],
    labels: dict[str, tuple[str, int | None]] | None = None,
    resolve: Callable[[str], Path] | None = None,
) -> list[TraceFile]:
    """Trace files with their metadata (only the footer is read); `labels` maps resolved checkpoint paths to
    the sweep's (method, seed); `resolve` turns a trace's checkpoint path into one (a results folder's
    ``resolve``: sweeps write paths relative to the project, and a report's kernel runs in notebooks/;
    default: against the current folder)."""
    resolve = resolve or (lambda p: Path(p).resolve())
    out = []
    for path in paths:
        meta = read_trace_meta(path)
        checkpoint = resolve(meta["checkpoint"])
        method, seed = (labels or {}).get(str(checkpoint), (meta["method"], meta["seed"]))
        seed = seed if seed is not None else meta["seed"]
        out.append(TraceFile(Path(path), meta, str(method), seed, checkpoint))
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
    traces = trace_files(paths, checkpoint_labels(folder), folder.resolve)
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
