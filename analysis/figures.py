"""Figures: tidy DataFrame (from analysis.metrics or the sweep tables) -> matplotlib Figure. No file I/O.

Figures are built on `matplotlib.figure.Figure` directly rather than through pyplot: no global figure
registry to leak memory in a report that draws hundreds of them, and no backend switch that would
break a notebook's inline display; saving renders with Agg. `save_figure` is the one place that writes.

Figure -> function -> data:
    expert loading bars          plot_expert_loading        metrics.expert_loading(traces, E)
    activated pathways           plot_pathways              metrics.top_paths(traces, N)
    conflict / consistency curve plot_conflict_curves       metrics.read_conflict_curves(metrics.jsonl ...)
    cosine distributions         plot_cosine_histograms     metrics.cosine_histogram(scores, by=("method",))
    benchmark comparison         plot_benchmark_comparison  results/<sweep>/scores.csv
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

MODALITY_COLOURS = {"image": "#4C72B0", "text": "#DD8452", "answer": "#55A868", "all": "#8C8C8C"}
STAT_TITLES = {"fraction": "conflicting-token fraction", "mean_cos": "gradient consistency"}
STAT_LABELS = {
    "fraction": "conflicting tokens (fraction)",
    "mean_cos": "mean cosine of token gradient\nto its expert's mean gradient",
}


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs columns {missing}; the table has {list(df.columns)}")


def _select(df: pd.DataFrame, column: str, value, what: str) -> pd.DataFrame:
    """Rows with df[column] == value; with value None the column must hold a single value."""
    if column not in df.columns:
        return df
    values = sorted(df[column].dropna().unique().tolist())
    if value is None:
        if len(values) > 1:
            raise ValueError(f"{what}: the table holds {column} values {values}; pass {column}=<one of them>")
        return df
    if value not in values:
        raise ValueError(f"{what}: {column}={value!r} is not in the table; choose one of {values}")
    return df[df[column] == value]


def _grid(
    num_panels: int, ncols: int, panel_size: tuple[float, float], *, sharey: bool = False
) -> tuple[Figure, list[Axes]]:
    ncols = max(1, min(ncols, num_panels))
    nrows = math.ceil(num_panels / ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey).ravel().tolist()
    for ax in axes[num_panels:]:
        ax.set_visible(False)
    return fig, axes[:num_panels]


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 150) -> Path:
    """Write `fig` to `path` (format from the suffix: .png, .pdf, .svg); create folders; return the path."""
    path = Path(path)
    if not path.suffix:
        raise ValueError(f"figure path {path} has no suffix; use .png, .pdf or .svg")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


# ------------------------------------------------------------------------------------- expert loading


_SHARE = {"modality": "in_modality", "all": "of_tokens"}


def plot_expert_loading(
    loading: pd.DataFrame,
    *,
    task: str | None = None,
    selection: str = "topk",
    normalise: str = "modality",
    modalities: Sequence[str] = ("image", "text"),
    ncols: int = 4,
) -> Figure:
    """Per-layer bars of each expert's load, image vs text (input: metrics.expert_loading).

    normalise="modality": side-by-side bars of share_in_modality (each modality sums to 100 % over
    experts, so image and text are comparable; MoE-LLaVA's normalised view). normalise="all": stacked
    bars of share_of_tokens (a bar's height is the expert's share of all token-slots). The dashed line is
    uniform loading, 100 % / E.
    """
    _require(
        loading,
        ["layer", "modality", "selection", "expert", "share_in_modality", "share_of_tokens"],
        "loading",
    )
    if normalise not in ("modality", "all"):
        raise ValueError(f"normalise={normalise!r}; use 'modality' or 'all'")
    if selection not in ("top1", "topk"):
        raise ValueError(f"selection={selection!r}; use 'top1' or 'topk'")
    table = _select(loading, "task", task, "plot_expert_loading")
    table = table[(table["selection"] == selection) & table["modality"].isin(modalities)]
    if table.empty:
        available = sorted(loading["modality"].unique())
        raise ValueError(f"no {selection} rows for modalities {list(modalities)}; the table has {available}")
    layers = sorted(table["layer"].unique())
    num_experts = int(loading["expert"].max()) + 1
    top_k = int(loading["top_k"].iloc[0]) if "top_k" in loading.columns else None
    ncols = max(1, min(ncols, len(layers)))
    fig, axes = _grid(len(layers), ncols, (max(3.2, 0.45 * num_experts + 1.5), 2.8), sharey=True)
    present = [m for m in modalities if m in set(table["modality"])]
    for i, (ax, layer) in enumerate(zip(axes, layers)):
        panel = table[table["layer"] == layer].assign(percent=lambda d: 100 * d[f"share_{_SHARE[normalise]}"])
        wide = panel.pivot(index="expert", columns="modality", values="percent").reindex(range(num_experts))
        wide = wide[present].fillna(0.0)
        x = np.arange(num_experts)
        if normalise == "modality":
            width = 0.8 / len(present)
            for j, modality in enumerate(present):
                offset = (j - (len(present) - 1) / 2) * width
                ax.bar(
                    x + offset, wide[modality], width, color=MODALITY_COLOURS.get(modality), label=modality
                )
        else:
            bottom = np.zeros(num_experts)
            for modality in present:
                ax.bar(
                    x,
                    wide[modality],
                    0.7,
                    bottom=bottom,
                    color=MODALITY_COLOURS.get(modality),
                    label=modality,
                )
                bottom += wide[modality].to_numpy()
        ax.axhline(
            100 / num_experts, color="black", linestyle="--", linewidth=1, label=f"uniform (1/{num_experts})"
        )
        ax.set_xticks(x)
        ax.set_title(f"decoder layer {layer}")
        ax.set_xlabel("expert")
        if i % ncols == 0:  # shared y axis: label the first column only
            ax.set_ylabel(
                "share of modality's slots (%)" if normalise == "modality" else "share of all slots (%)"
            )
        sns.despine(ax=ax)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    chosen = "top-1 expert" if selection == "top1" else (f"top-{top_k} experts" if top_k else "top-k experts")
    view = "normalised within each modality" if normalise == "modality" else "stacked share of all tokens"
    fig.suptitle(f"Expert loading{f' on {task}' if task else ''}: {chosen}, {view}")
    return fig


# ------------------------------------------------------------------------------------------- pathways


def plot_pathways(
    paths: pd.DataFrame, *, task: str | None = None, modality: str = "all", num_experts: int | None = None
) -> Figure:
    """The most frequent top-1 expert paths through a (MoE layer x expert) grid (input: metrics.top_paths).

    Left: one line per path, width proportional to its frequency, small vertical offsets so that paths
    sharing a segment stay visible. Right: each path's share of tokens (%), same colours.
    """
    _require(paths, ["modality", "rank", "path", "layers", "path_label", "frequency"], "paths")
    table = _select(paths, "task", task, "plot_pathways")
    table = _select(table, "modality", modality, "plot_pathways").sort_values("rank")
    if table.empty:
        raise ValueError("no paths to draw")
    layers = list(table["layers"].iloc[0])
    num_experts = num_experts or int(max(max(p) for p in table["path"])) + 1
    num_paths = len(table)
    colours = sns.color_palette("viridis", num_paths)
    fig = Figure(
        figsize=(max(6.0, 0.9 * len(layers) + 3.5) + 3.0, max(3.2, 0.55 * num_experts + 1.5)),
        layout="constrained",
    )
    ax_lines, ax_bars = fig.subplots(1, 2, width_ratios=[max(2.0, 0.6 * len(layers)), 1.2])
    max_frequency = table["frequency"].max()
    x = np.arange(len(layers))
    for i, row in enumerate(table.itertuples()):
        offset = (i - (num_paths - 1) / 2) * min(0.5 / num_paths, 0.06)
        width = 0.8 + 5.0 * row.frequency / max_frequency
        ax_lines.plot(
            x,
            np.asarray(row.path) + offset,
            color=colours[i],
            linewidth=width,
            alpha=0.8,
            marker="o",
            markersize=3 + width / 2,
            solid_capstyle="round",
            zorder=num_paths - i,
        )
    ax_lines.set_xticks(x, [str(layer) for layer in layers])
    ax_lines.set_yticks(range(num_experts))
    ax_lines.set_ylim(-0.6, num_experts - 0.4)
    ax_lines.invert_yaxis()
    ax_lines.set_xlabel("MoE layer (decoder layer index)")
    ax_lines.set_ylabel("top-1 expert")
    ax_lines.grid(axis="y", alpha=0.3)
    ax_lines.set_title("paths through the layers (width ~ frequency)")
    ranks = np.arange(num_paths)
    ax_bars.barh(ranks, 100 * table["frequency"].to_numpy(), color=colours)
    ax_bars.set_yticks(ranks, [f"#{r}  {label}" for r, label in zip(table["rank"], table["path_label"])])
    for rank, frequency in zip(ranks, table["frequency"]):
        ax_bars.text(100 * frequency, rank, f" {100 * frequency:.1f}", va="center", fontsize=8)
    ax_bars.margins(x=0.18)
    ax_bars.invert_yaxis()
    ax_bars.set_xlabel("tokens on the path (%)")
    ax_bars.set_title(f"top {num_paths}: {100 * table['frequency'].sum():.1f} % of tokens")
    sns.despine(ax=ax_bars)
    what = f"{modality} tokens" if modality != "all" else "all tokens"
    fig.suptitle(f"Activated pathways{f' on {task}' if task else ''} ({what})")
    return fig


# ------------------------------------------------------------------------------------ conflict curves


def plot_conflict_curves(
    curves: pd.DataFrame,
    *,
    stats: Sequence[str] = ("fraction", "mean_cos"),
    hue: str = "method",
    layer: int | None = None,
) -> Figure:
    """Conflict statistics over training steps, one panel per stat, one line per `hue` value.

    Input: metrics.conflict_curves / read_conflict_curves. With layer=None each run's value at a step
    is the mean over its per-layer keys; with a layer index, that layer only. Several runs of one method
    (seeds) are drawn as their mean with a ±1 s.d. band.
    """
    _require(curves, ["run", "step", "layer", "stat", "value", hue], "curves")
    table = curves[curves["layer"].notna()]
    if layer is not None:
        available = sorted(table["layer"].unique().tolist())
        if layer not in available:
            raise ValueError(f"layer={layer} has no conflict curves; layers with curves: {available}")
        table = table[table["layer"] == layer]
    missing = sorted(set(stats) - set(table["stat"]))
    if missing:
        raise ValueError(
            f"stats {missing} are not in the curves; available: {sorted(table['stat'].unique())}"
        )
    per_run = table[table["stat"].isin(stats)].groupby(
        [hue, "run", "stat", "step"], as_index=False, dropna=False
    )
    per_run = per_run["value"].mean()
    fig, axes = _grid(len(stats), len(stats), (4.6, 3.4))
    for ax, stat in zip(axes, stats):
        sns.lineplot(
            data=per_run[per_run["stat"] == stat],
            x="step",
            y="value",
            hue=hue,
            errorbar="sd",
            ax=ax,
            marker="o",
            markersize=3,
            hue_order=sorted(per_run[hue].dropna().unique()),
        )
        ax.set_xlabel("training step")
        ax.set_ylabel(STAT_LABELS.get(stat, stat))
        ax.set_title(STAT_TITLES.get(stat, stat))
        sns.despine(ax=ax)
    where = f"decoder layer {layer}" if layer is not None else "mean over MoE layers"
    fig.suptitle(f"Token gradient conflict during training ({where}; band: ±1 s.d. over runs)")
    return fig


def plot_cosine_histograms(hist: pd.DataFrame, *, hue: str = "method", ncols: int = 4) -> Figure:
    """Distribution of token-gradient cosines per `hue` (input: metrics.cosine_histogram).

    Each group is drawn as a step density (integrates to 1); one panel per layer when the table has a
    `layer` column with several values. Cosines left of the dotted line at 0 oppose the expert's mean.
    """
    _require(hist, [hue, "bin_left", "bin_right", "density"], "hist")
    layers = sorted(hist["layer"].unique()) if "layer" in hist.columns else [None]
    fig, axes = _grid(len(layers), ncols, (4.2, 3.2))
    groups = sorted(hist[hue].unique())
    colours = dict(zip(groups, sns.color_palette("deep", len(groups))))
    for ax, layer in zip(axes, layers):
        panel = hist if layer is None else hist[hist["layer"] == layer]
        for group in groups:
            rows = panel[panel[hue] == group].sort_values("bin_left")
            edges = np.append(rows["bin_left"].to_numpy(), rows["bin_right"].to_numpy()[-1:])
            ax.stairs(
                rows["density"].to_numpy(), edges, color=colours[group], linewidth=1.6, label=str(group)
            )
            ax.stairs(rows["density"].to_numpy(), edges, color=colours[group], alpha=0.15, fill=True)
        ax.axvline(0.0, color="black", linestyle=":", linewidth=1)
        ax.set_xlabel("cosine(token gradient, expert mean gradient)")
        ax.set_ylabel("density")
        ax.set_title("all layers" if layer is None else f"decoder layer {layer}")
        sns.despine(ax=ax)
    axes[0].legend(title=hue, frameon=False)
    fig.suptitle("Token gradient cosine distribution")
    return fig


# ------------------------------------------------------------------------------------------ benchmarks


def plot_benchmark_comparison(
    scores: pd.DataFrame, *, method_order: Sequence[str] | None = None, ncols: int = 5
) -> Figure:
    """One panel per (task, metric): bar = mean over seeds, error bar = ±1 s.d. (n-1), dots = seeds.

    Input: the sweep's long scores table (columns method, seed, task, metric, value). Panels have their
    own y scale, since benchmarks report on different scales (accuracy in %, MME's summed score).
    """
    _require(scores, ["method", "seed", "task", "metric", "value"], "scores")
    if not np.isfinite(scores["value"].to_numpy(np.float64)).all():
        bad = scores[~np.isfinite(scores["value"].to_numpy(np.float64))].iloc[0].to_dict()
        raise ValueError(f"scores has non-finite values, e.g. {bad}; re-run or drop the failed evaluation")
    if scores.duplicated(["method", "seed", "task", "metric"]).any():
        raise ValueError(
            "scores has several values for one (method, seed, task, metric); aggregate them first"
        )
    methods = list(method_order) if method_order is not None else sorted(scores["method"].unique())
    unknown = sorted(set(scores["method"]) - set(methods))
    if unknown:
        raise ValueError(f"methods {unknown} are missing from method_order={methods}")
    panels = (
        scores[["task", "metric"]].drop_duplicates().sort_values(["task", "metric"]).itertuples(index=False)
    )
    panels = list(panels)
    colours = dict(zip(methods, sns.color_palette("deep", len(methods))))
    fig, axes = _grid(len(panels), ncols, (max(2.4, 0.7 * len(methods) + 1.0), 3.0))
    seeds_per_method = scores.groupby("method")["seed"].nunique()
    for ax, (task, metric) in zip(axes, panels):
        panel = scores[(scores["task"] == task) & (scores["metric"] == metric)]
        summary = panel.groupby("method")["value"].agg(["mean", "std", "count"]).reindex(methods)
        x = np.arange(len(methods))
        ax.bar(
            x,
            summary["mean"],
            color=[colours[m] for m in methods],
            yerr=summary["std"].fillna(0.0),
            capsize=3,
            alpha=0.85,
        )
        for i, method in enumerate(methods):
            values = panel.loc[panel["method"] == method, "value"].to_numpy()
            jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(len(values))
            ax.scatter(i + jitter, values, color="black", s=10, zorder=3)
        # zoom on the values (the differences between methods are often < 1 point); axis floor at 0
        low, high = float(panel["value"].min()), float(panel["value"].max())
        spread = (high - low) or max(abs(high) * 0.05, 1e-3)
        ax.set_ylim(max(0.0, low - 1.5 * spread) if low >= 0 else low - 1.5 * spread, high + 0.8 * spread)
        crowded = len(methods) > 3 or max(len(m) for m in methods) > 8
        ax.set_xticks(x, methods, rotation=30 if crowded else 0, ha="right" if crowded else "center")
        ax.set_title(task)
        ax.set_ylabel(metric)
        ax.set_xlabel("method")
        sns.despine(ax=ax)
    seeds = ", ".join(f"{m} {seeds_per_method.get(m, 0)}" for m in methods)
    fig.suptitle(
        f"Benchmark scores: bar = mean ± 1 s.d. over seeds, dot = one seed (seeds: {seeds}); y axes zoomed"
    )
    return fig
