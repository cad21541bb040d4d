"""Diagnostics of the peer routing methods in the reports (notebooks/05_peers.ipynb; docs/peers_routing.md):
CompeteSMoE's competition (steps, router-vs-competition agreement), AdaMoE's true experts per token
(histogram, by modality) and expert FLOPs per token, MoMa's loading within each modality group, and the
instruction-cluster -> expert NMI of MoCLE-style routing.

Two inputs, each optional (a missing one is a visible note): the runs' metrics.jsonl (what each method's
objective logs during training, ``stgc.objectives.peers`` / ``stgc.objectives.competesmoe``), and the
routing traces of evaluation prompts (routing/*.parquet from ``stgc analyze capture``; AdaMoE's null
columns are in them, MoCLE traces carry the cluster id of each prompt in their metadata). Compute
functions are pure (DataFrame -> DataFrame), plot functions DataFrame -> Figure, and ``peers`` is the
section the notebook shows.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import metrics as M
from analysis.results import checkpoint_labels, find_runs, open_results
from analysis.schema import list_column_matrix, read_traces
from analysis.sections import FigureInfo, Section, mean_over_seeds, trace_files

FAMILIES = ("competesmoe", "adamoe", "moma", "mocle")
FIGURES: dict[str, FigureInfo] = {
    "peers_training_curves.png": FigureInfo(
        "05_peers",
        "peers.plot_curves",
        "peers.method_curves(<run>/metrics.jsonl): competesmoe/agree_top1, adamoe/true_experts_mean, "
        "moma/{image,text}_imbalance, mocle/nmi",
        "runs' metrics.jsonl (analysis.results.find_runs)",
    ),
    "peers_true_experts_<method>.png": FigureInfo(
        "05_peers",
        "peers.plot_true_experts",
        "peers.true_experts(trace, bank_experts): true experts per token by modality",
        "routing/<checkpoint>.parquet of AdaMoE-style checkpoints",
    ),
}
TABLES: dict[str, str] = {
    "peers_competition.csv": "peers.competition_summary(metrics.jsonl) per run [05]",
    "peers_final.csv": "peers.final_values(metrics.jsonl): each diagnostic over the last 20% of steps [05]",
    "peers_true_experts.csv": "peers.true_experts(trace) with FLOPs per token, mean/std over seeds [05]",
    "peers_group_loading.csv": "peers.group_loading(trace): each expert's share within its group [05]",
    "peers_cluster_nmi.csv": "metrics.nmi(trace + the prompts' clusters, 'cluster', by=('task',)) [05]",
}


# --------------------------------------------------------------------------------------------------------
# training metrics


def method_curves(metrics: pd.DataFrame) -> pd.DataFrame:
    """The peer methods' keys of a long metrics table (``metrics.read_metrics_jsonl``): columns run,
    method, step, family (competesmoe / adamoe / moma / mocle), key, value."""
    family = metrics["key"].str.split("/").str[0]
    table = metrics[family.isin(FAMILIES)].copy()
    table.insert(3, "family", family[family.isin(FAMILIES)])
    return table.reset_index(drop=True)


def competition_summary(curves: pd.DataFrame) -> pd.DataFrame:
    """Per CompeteSMoE run: steps, competition steps (a layer competed), mean competing layers per step,
    and the router's agreement with the competition (same top-1; top-k overlap) on competition steps."""
    comp = curves[curves["family"] == "competesmoe"]
    rows = []
    for (run, method), g in comp.groupby(["run", "method"], dropna=False):
        layers = g[g["key"] == "competesmoe/competition_layers"]
        rows.append(
            {
                "run": run,
                "method": method,
                "steps": int(layers["step"].nunique()),
                "competition_steps": int((layers["value"] > 0).sum()),
                "layers_per_step": float(layers["value"].mean()) if len(layers) else np.nan,
                "agree_top1": float(g.loc[g["key"] == "competesmoe/agree_top1", "value"].mean()),
                "overlap": float(g.loc[g["key"] == "competesmoe/overlap", "value"].mean()),
            }
        )
    return pd.DataFrame(rows, columns=["run", "method", "steps", "competition_steps", "layers_per_step",
                                       "agree_top1", "overlap"])  # fmt: skip


def final_values(curves: pd.DataFrame, share: float = 0.2) -> pd.DataFrame:
    """Each run's mean of every peer key over its last ``share`` of logged steps (per-step diagnostics are
    noisy micro-batch figures): columns run, method, family, key, value, steps."""
    out = []
    for (run, method, key), g in curves.groupby(["run", "method", "key"], dropna=False):
        last = g["step"].max()
        first = last - max(1, int(np.ceil(share * last))) + 1
        tail = g[g["step"] >= first]
        out.append((run, method, key.split("/")[0], key, float(tail["value"].mean()), len(tail)))
    return pd.DataFrame(out, columns=["run", "method", "family", "key", "value", "steps"])


# --------------------------------------------------------------------------------------------------------
# traces


def true_experts(df: pd.DataFrame, bank_experts: int) -> pd.DataFrame:
    """True (bank) experts that ran per token, by modality and layer: columns modality, layer, n_true,
    tokens, share (of the modality's tokens in that layer). A slot ran a true expert when its column is
    < ``bank_experts`` and its combine weight is > 0 (AdaMoE's null columns are >= bank_experts)."""
    experts = list_column_matrix(df["topk_experts"])
    weights = list_column_matrix(df["topk_weights"])
    n_true = ((experts < bank_experts) & (weights > 0)).sum(1)
    table = pd.DataFrame(
        {"modality": df["modality"].to_numpy(), "layer": df["layer"].to_numpy(), "n_true": n_true}
    )
    counts = table.groupby(["modality", "layer", "n_true"]).size().rename("tokens").reset_index()
    counts["share"] = counts["tokens"] / counts.groupby(["modality", "layer"])["tokens"].transform("sum")
    return counts


def expert_flops_per_token(true_mean: float, hidden: int, ffn: int, ffn_kind: str) -> float:
    """Forward FLOPs of the experts per token: mean true experts x one expert's (SwiGLU: 3 matrices,
    6 D F; GELU: 2 matrices, 4 D F)."""
    return true_mean * (6 if ffn_kind == "swiglu" else 4) * hidden * ffn


def group_loading(df: pd.DataFrame, image_experts: int) -> pd.DataFrame:
    """MoMa: each expert's share of its modality group's assignments, per layer (image group: experts
    [0, image_experts), fed by image tokens; text group: the rest)."""
    experts = list_column_matrix(df["topk_experts"])
    weights = list_column_matrix(df["topk_weights"])
    rows = []
    layer = np.repeat(df["layer"].to_numpy(), experts.shape[1])
    flat_e, ran = experts.reshape(-1), weights.reshape(-1) > 0
    for lay in np.unique(layer):
        for group, members in (
            ("image", range(image_experts)),
            ("text", range(image_experts, experts.max() + 1)),
        ):
            sel = (layer == lay) & ran & np.isin(flat_e, list(members))
            total = int(sel.sum())
            for e in members:
                n = int((sel & (flat_e == e)).sum())
                rows.append((int(lay), group, int(e), n, n / total if total else np.nan))
    return pd.DataFrame(rows, columns=["layer", "group", "expert", "assignments", "share"])


def cluster_nmi(df: pd.DataFrame, clusters: dict[str, dict[str, int]]) -> pd.DataFrame:
    """NMI between each prompt's instruction cluster (from the trace metadata) and the top-1 expert, per
    task and layer (``metrics.nmi``)."""
    labels = pd.DataFrame(
        [(task, sid, c) for task, ids in clusters.items() for sid, c in ids.items()],
        columns=["task", "sample_id", "cluster"],
    )
    joined = df.merge(labels, on=["task", "sample_id"], how="inner")
    return M.nmi(joined, "cluster", by=("task",))


# --------------------------------------------------------------------------------------------------------
# figures


def plot_curves(curves: pd.DataFrame, keys: Sequence[str]):
    """One panel per key: value over steps, a line per run."""
    import matplotlib.pyplot as plt

    keys = [k for k in keys if (curves["key"] == k).any()]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for (run, method), g in curves[curves["key"] == key].groupby(["run", "method"], dropna=False):
            g = g.sort_values("step")
            ax.plot(g["step"], g["value"], label=f"{method} ({run})", lw=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_true_experts(hist: pd.DataFrame, title: str):
    """Share of tokens with 0..k true experts, per modality (bars), pooled over layers."""
    import matplotlib.pyplot as plt

    pooled = hist.groupby(["modality", "n_true"])["tokens"].sum().reset_index()
    pooled["share"] = pooled["tokens"] / pooled.groupby("modality")["tokens"].transform("sum")
    table = pooled.pivot(index="n_true", columns="modality", values="share").fillna(0.0)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    table.plot.bar(ax=ax, rot=0)
    ax.set_xlabel("true experts per token")
    ax.set_ylabel("share of tokens")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------------
# the section


@dataclasses.dataclass(frozen=True)
class _Model:
    bank_experts: int
    hidden: int
    ffn: int
    ffn_kind: str
    router: dict


def _model_of(checkpoint: str | Path, meta: dict) -> _Model | None:
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    text = config["text_config"]
    kind = "gelu" if text.get("model_type") == "phi" else "swiglu"
    moe = config.get("moe", {})
    return _Model(int(meta.get("bank_experts", moe.get("num_experts", 4))), text["hidden_size"],
                  text["intermediate_size"], kind, moe.get("router", {}))  # fmt: skip


def peers(results_dir: str | Path | None = None, runs_dir: str | Path | None = None) -> Section:
    """05: the peer methods' diagnostics from the runs' metrics.jsonl and the routing traces."""
    folder = open_results(results_dir, runs_dir)
    section = Section("Peer routing methods: diagnostics", folder)
    runs = find_runs(folder)
    present = runs[runs["exists"].astype(bool)] if len(runs) else runs
    curves = pd.DataFrame()
    if len(present):
        curves = pd.concat(
            [
                method_curves(
                    M.read_metrics_jsonl(
                        row.metrics, run=row.run, method=None if pd.isna(row.method) else row.method
                    )
                )
                for row in present.itertuples()
            ],
            ignore_index=True,
        )
    if present.empty:
        section.missing("no training runs found (their metrics.jsonl); pass `--runs-dir runs/<sweep>`.")
    elif curves.empty:
        section.note(
            "no run logged peer-method diagnostics (competesmoe/, adamoe/, moma/, mocle/ keys in "
            "metrics.jsonl); train a peer method (e.g. `stgc train tiny_adamoe`) or pass `--runs-dir`."
        )
    else:
        keys = ["competesmoe/agree_top1", "adamoe/true_experts_mean", "moma/image_imbalance",
                "moma/text_imbalance", "mocle/nmi"]  # fmt: skip
        section.figure(
            "peers_training_curves", plot_curves(curves, keys), "Peer-method diagnostics during training"
        )
        comp = competition_summary(curves)
        if len(comp):
            section.table("peers_competition", comp, "CompeteSMoE: competition steps and router agreement")
        final = final_values(curves)
        summary = mean_over_seeds(final, ["method", "key"], ["value"])
        section.table(
            "peers_final", summary, "Each diagnostic over the last 20% of steps, mean/std over runs"
        )

    traces = trace_files(folder.trace_files(), checkpoint_labels(folder), folder.resolve)
    true_rows, loading_rows, nmi_rows = [], [], []
    for trace in traces:
        model = _model_of(trace.checkpoint, trace.meta)
        router = model.router.get("name") if model else None
        if router not in ("adamoe", "moma") and "instruction_clusters" not in trace.meta:
            continue
        df, meta = read_traces(
            trace.path, columns=["sample_id", "task", "modality", "layer", "topk_experts", "topk_weights"]
        )
        if router == "adamoe":
            hist = true_experts(df, model.bank_experts)
            section.figure(
                f"peers_true_experts_{trace.method}",
                plot_true_experts(hist, f"{trace.method} seed {trace.seed}: true experts per token"),
                f"{trace.method}: true experts per token by modality (evaluation prompts)",
            )
            for modality, g in hist.groupby("modality"):
                mean = float((g["n_true"] * g["tokens"]).sum() / g["tokens"].sum())
                true_rows.append({"method": trace.method, "seed": trace.seed, "modality": modality,
                                  "true_experts": mean, "gflops_per_token": expert_flops_per_token(
                                      mean, model.hidden, model.ffn, model.ffn_kind) / 1e9})  # fmt: skip
        if router == "moma":
            loading = group_loading(df, int(model.router.get("image_experts", 2)))
            loading_rows.append(loading.assign(method=trace.method, seed=trace.seed))
        if "instruction_clusters" in meta:
            nmi_rows.append(
                cluster_nmi(df, meta["instruction_clusters"]).assign(method=trace.method, seed=trace.seed)
            )
    if true_rows:
        table = mean_over_seeds(
            pd.DataFrame(true_rows), ["method", "modality"], ["true_experts", "gflops_per_token"]
        )
        section.table(
            "peers_true_experts", table, "AdaMoE: true experts and expert GFLOPs per token, by modality"
        )
    if loading_rows:
        section.table(
            "peers_group_loading",
            pd.concat(loading_rows, ignore_index=True),
            "MoMa: loading within each group",
        )
    if nmi_rows:
        section.table(
            "peers_cluster_nmi", pd.concat(nmi_rows, ignore_index=True), "MoCLE: cluster -> top-1 expert NMI"
        )
    if not traces:
        section.missing("no routing traces (routing/*.parquet); `stgc analyze capture` writes them.")
    elif not (true_rows or loading_rows or nmi_rows):
        section.note("No trace of an AdaMoE, MoMa or MoCLE-style checkpoint in routing/.")
    return section
