"""Routing measurements (the gradient-conflict ones: analysis/conflict_metrics.py): pure functions
DataFrame -> tidy (long) DataFrame.

Inputs are routing-trace tables (analysis.schema: one row per (sample, token, MoE layer)), training
curves from a run's `metrics.jsonl`, or per-(token, expert) conflict-score tables; the conflict ones (the
last two) are in `analysis.conflict_metrics`, importable from here. Nothing here knows a
model size: E comes from an argument or the length of `probs`, K from the length of `topk_experts`,
the MoE layers from the `layer` values, the image tokens from the `modality` column.

Shape legend: N trace rows, T tokens, E experts, K top-k, L MoE layers, G groups.
`by` arguments name extra grouping columns (e.g. ("task",) or ("method", "task") after concatenating
traces of several checkpoints with a `method` column); `layer` is always a grouping key where stated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import normalized_mutual_info_score

from analysis.conflict_metrics import (
    conflict_curves,
    conflict_summary,
    cosine_histogram,
    read_conflict_curves,
    read_metrics_jsonl,
)
from analysis.schema import infer_num_experts, list_column_matrix, require_columns

TOKEN_KEY = ("task", "sample_id", "position")
ALIGN_KEY = ("task", "sample_id", "position", "layer")


def _groups(df: pd.DataFrame, keys: list[str]) -> tuple[np.ndarray, pd.DataFrame]:
    """Group code per row (0..G-1, in sorted key order) and the (G, len(keys)) table of key values."""
    grouped = df.groupby(keys, sort=True, observed=True, dropna=False)
    codes_N = grouped.ngroup().to_numpy()
    key_table = grouped.size().reset_index()[keys]
    return codes_N, key_table


def _top1(df: pd.DataFrame) -> np.ndarray:
    return list_column_matrix(df["topk_experts"])[:, 0].astype(np.int64)


# --------------------------------------------------------------------------------------------- loading


def expert_loading(df: pd.DataFrame, num_experts: int, *, by: Sequence[str] = ("task",)) -> pd.DataFrame:
    """Expert loading per (*by, layer, modality, selection, expert), including experts that got no token.

    For each group of tokens (a modality, or modality == "all" for all tokens of the layer) and each
    `selection` ("top1": only the first-ranked expert; "topk": all K selected experts, one slot each):
        count             c_e = number of token-slots routed to expert e
        modality_slots    S_m = tokens of the modality x slots per token (1 for top1, K for topk)
        all_slots         S   = all tokens of the (group, layer) x slots per token
        share_in_modality c_e / S_m  (normalised within the modality: sums to 1 over experts for each
                          modality, so image and text loading are comparable whatever their token counts)
        share_of_tokens   c_e / S    (raw share of all token-slots: summed over the modalities it gives the
                          expert's total share, i.e. a stacked bar; sums to 1 over experts and modalities)
        token_fraction    c_e / T_m  (fraction of the modality's tokens that selected e; sums to K for topk)
    Uniform routing gives share_in_modality = 1/E.
    """
    by = list(by)
    require_columns(df, [*by, "layer", "modality", "topk_experts"], "expert_loading")
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts} must be >= 1; read it from the trace metadata")
    topk_NK = list_column_matrix(df["topk_experts"]).astype(np.int64)
    if topk_NK.max() >= num_experts:
        raise ValueError(
            f"expert id {topk_NK.max()} in topk_experts is >= num_experts={num_experts}; pass the model's E"
        )
    if "probs" in df.columns and infer_num_experts(df) != num_experts:
        raise ValueError(f"probs lists have {infer_num_experts(df)} entries but num_experts={num_experts}")
    k = topk_NK.shape[1]
    expert_E = np.arange(num_experts)

    pieces = []
    for modality_view in (df, df.assign(modality="all")):
        codes_N, keys_G = _groups(modality_view, [*by, "layer", "modality"])
        num_groups = len(keys_G)
        tokens_G = np.bincount(codes_N, minlength=num_groups)
        for selection, experts_NS in (("top1", topk_NK[:, :1]), ("topk", topk_NK)):
            slots = experts_NS.shape[1]
            flat = (codes_N[:, None] * num_experts + experts_NS).ravel()
            counts_GE = np.bincount(flat, minlength=num_groups * num_experts).reshape(num_groups, num_experts)
            piece = keys_G.loc[keys_G.index.repeat(num_experts)].reset_index(drop=True)
            piece["selection"] = selection
            piece["expert"] = np.tile(expert_E, num_groups)
            piece["count"] = counts_GE.ravel()
            piece["modality_tokens"] = np.repeat(tokens_G, num_experts)
            piece["modality_slots"] = piece["modality_tokens"] * slots
            pieces.append(piece)
    out = pd.concat(pieces, ignore_index=True)
    all_slots = out[out["modality"] == "all"].groupby([*by, "layer", "selection"])["modality_slots"].first()
    out = out.join(all_slots.rename("all_slots"), on=[*by, "layer", "selection"])
    out["share_in_modality"] = out["count"] / out["modality_slots"]
    out["share_of_tokens"] = out["count"] / out["all_slots"]
    out["token_fraction"] = out["count"] / out["modality_tokens"]
    out["top_k"] = k
    return out.sort_values([*by, "layer", "selection", "modality", "expert"], ignore_index=True)


# -------------------------------------------------------------------------------------------- pathways


def token_paths(df: pd.DataFrame, *, by: Sequence[str] = ("task",)) -> pd.DataFrame:
    """One row per token: its top-1 expert at each MoE layer, in layer order, as a tuple `path`.

    Tokens are identified by (task, sample_id, position) plus `by`. Every token must appear in every MoE
    layer of the table (L = number of distinct `layer` values); otherwise ValueError, as a path with a gap
    is not comparable with full ones. Columns: *by, task, sample_id, position, modality, path, path_id
    (an integer id shared by equal paths within this table).
    """
    by = list(by)
    token_key = list(dict.fromkeys([*by, *TOKEN_KEY]))
    require_columns(df, [*token_key, "layer", "modality", "topk_experts"], "token_paths")
    layers = np.sort(df["layer"].unique())
    num_layers = len(layers)
    table = df[[*token_key, "layer", "modality"]].copy()
    table["top1"] = _top1(df)
    table = table.sort_values([*token_key, "layer"], ignore_index=True)
    layers_per_token = table.groupby(token_key, sort=False).size()
    if (layers_per_token != num_layers).any():
        bad = layers_per_token[layers_per_token != num_layers]
        raise ValueError(
            f"{len(bad)} tokens are not traced in all {num_layers} MoE layers {layers.tolist()} (e.g. "
            f"{dict(zip(token_key, bad.index[0], strict=True))} has {bad.iloc[0]}); capture every MoE layer "
            "or select a common layer subset before computing pathways"
        )
    top1_TL = table["top1"].to_numpy().reshape(-1, num_layers)
    modality_TL = table["modality"].to_numpy().reshape(-1, num_layers)
    if (modality_TL != modality_TL[:, :1]).any():
        raise ValueError("a token has different modality values across layers; the trace is inconsistent")
    _, path_id_T = np.unique(top1_TL, axis=0, return_inverse=True)
    out = table.iloc[::num_layers][token_key].reset_index(drop=True)
    out["modality"] = modality_TL[:, 0]
    out["path"] = [tuple(int(e) for e in row) for row in top1_TL]
    out["path_id"] = path_id_T.ravel()
    out.attrs["layers"] = tuple(int(layer) for layer in layers)
    return out


def _path_frequencies(paths: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Counts of each path per (*by, modality), modality "all" included; sorted by count desc, then path.

    `path_id` comes from np.unique over the (T, L) expert matrix, so its order is the paths' lexicographic
    order and breaks count ties deterministically.
    """
    both = pd.concat([paths, paths.assign(modality="all")], ignore_index=True)
    keys = [*by, "modality"]
    counts = both.groupby([*keys, "path_id"], sort=True).size().rename("count").reset_index()
    counts["frequency"] = counts["count"] / counts.groupby(keys)["count"].transform("sum")
    counts = counts.sort_values([*keys, "count", "path_id"], ascending=[True] * len(keys) + [False, True])
    counts["rank"] = counts.groupby(keys).cumcount() + 1
    path_by_id = paths.drop_duplicates("path_id").set_index("path_id")["path"]
    counts["path"] = counts["path_id"].map(path_by_id)
    return counts.reset_index(drop=True)


def pathways(df: pd.DataFrame, top_n: int = 10, *, by: Sequence[str] = ("task",)) -> pd.DataFrame:
    """Activated-pathway statistics per (*by, modality), modality "all" included.

    A token's path is its sequence of top-1 experts over the L MoE layers (see `token_paths`). With
    f_p = (tokens on path p) / T over the T tokens of the group:
        n_tokens          T
        num_layers        L
        n_distinct_paths  number of paths with f_p > 0 (at most min(T, E**L))
        path_entropy      H = -sum_p f_p log f_p, in nats (0: every token takes one path)
        top_n_coverage    sum of the `top_n` largest f_p
    """
    if top_n < 1:
        raise ValueError(f"top_n={top_n} must be >= 1")
    by = list(by)
    paths = token_paths(df, by=by)
    freq = _path_frequencies(paths, by)
    grouped = freq.groupby([*by, "modality"], sort=True)
    out = pd.DataFrame(
        {
            "n_tokens": grouped["count"].sum(),
            "n_distinct_paths": grouped.size(),
            "path_entropy": grouped["frequency"].apply(lambda f: float(-(f * np.log(f)).sum())),
            "top_n_coverage": freq[freq["rank"] <= top_n].groupby([*by, "modality"])["frequency"].sum(),
        }
    ).reset_index()
    out.insert(len(by) + 1, "num_layers", len(paths.attrs["layers"]))
    out["top_n"] = top_n
    return out


def top_paths(df: pd.DataFrame, top_n: int = 10, *, by: Sequence[str] = ("task",)) -> pd.DataFrame:
    """The `top_n` most frequent paths per (*by, modality), modality "all" included.

    Columns: *by, modality, rank (1 = most frequent; ties broken by the path's expert ids), path (tuple
    of top-1 experts, one per MoE layer), layers (tuple of the decoder-layer indices, same length),
    path_label ("2>0>3>1"), count, frequency (count / tokens of the group).
    """
    if top_n < 1:
        raise ValueError(f"top_n={top_n} must be >= 1")
    by = list(by)
    paths = token_paths(df, by=by)
    freq = _path_frequencies(paths, by)
    out = freq[freq["rank"] <= top_n].reset_index(drop=True)
    out["layers"] = [paths.attrs["layers"]] * len(out)
    out["path_label"] = [">".join(str(e) for e in path) for path in out["path"]]
    return out[[*by, "modality", "rank", "path", "layers", "path_label", "count", "frequency"]]


# ------------------------------------------------------------------------------------- routing stats


def routing_stats(
    df: pd.DataFrame, *, by: Sequence[str] = ("task",), num_experts: int | None = None
) -> pd.DataFrame:
    """Routing sharpness and balance per (*by, layer).

    With probs p (softmax over E experts), p_(1) >= p_(2) its two largest entries, and c_e the number of
    tokens whose top-1 expert is e (c_e = 0 for experts that got none; E from `num_experts` or len(probs)):
        n_tokens                 T
        mean_entropy             mean over tokens of H = -sum_e p_e log p_e (nats; log E when uniform)
        mean_entropy_normalised  mean_entropy / log E (NaN for E = 1)
        mean_margin              mean over tokens of p_(1) - p_(2) (p_(2) = 0 when E = 1)
        top1_cv                  std_e(c) / mean_e(c), population std over all E experts
        top1_max_over_mean       max_e(c) / mean_e(c) (1 = balanced, E = all tokens on one expert)
        top1_min_share           min_e(c) / T (0 when some expert is never chosen)
        n_unused_experts         number of experts with c_e = 0
    """
    by = list(by)
    require_columns(df, [*by, "layer", "topk_experts", "probs", "entropy"], "routing_stats")
    e = infer_num_experts(df)
    if num_experts is not None and num_experts != e:
        raise ValueError(f"num_experts={num_experts} but probs lists have {e} entries; they must agree")
    probs_NE = list_column_matrix(df["probs"]).astype(np.float64)
    sorted_NE = -np.sort(-probs_NE, axis=1)
    margin_N = sorted_NE[:, 0] - (sorted_NE[:, 1] if e > 1 else 0.0)
    codes_N, keys_G = _groups(df, [*by, "layer"])
    num_groups = len(keys_G)
    counts_GE = np.bincount(codes_N * e + _top1(df), minlength=num_groups * e).reshape(num_groups, e)
    tokens_G = counts_GE.sum(axis=1)
    mean_count_G = tokens_G / e
    out = keys_G.copy()
    out["n_tokens"] = tokens_G
    out["mean_entropy"] = np.bincount(codes_N, weights=df["entropy"].to_numpy(np.float64)) / tokens_G
    out["mean_entropy_normalised"] = out["mean_entropy"] / np.log(e) if e > 1 else np.nan
    out["mean_margin"] = np.bincount(codes_N, weights=margin_N, minlength=num_groups) / tokens_G
    out["top1_cv"] = counts_GE.std(axis=1) / mean_count_G
    out["top1_max_over_mean"] = counts_GE.max(axis=1) / mean_count_G
    out["top1_min_share"] = counts_GE.min(axis=1) / tokens_G
    out["n_unused_experts"] = (counts_GE == 0).sum(axis=1)
    out["num_experts"] = e
    return out


# ------------------------------------------------------------------------------------ two checkpoints


def _align(df_a: pd.DataFrame, df_b: pd.DataFrame, by: list[str], allow_partial: bool) -> pd.DataFrame:
    """Inner-join two traces on (task, sample_id, position, layer); ValueError if the key sets differ."""
    key = list(ALIGN_KEY)
    extra = [c for c in by if c not in key]
    for name, table in (("df_a", df_a), ("df_b", df_b)):
        require_columns(table, [*key, "modality", "topk_experts"], f"switch_overlap ({name})")
    require_columns(df_a, extra, "switch_overlap (df_a, `by` columns)")
    left = df_a[list(dict.fromkeys([*key, *extra, "modality", "topk_experts"]))]
    right = df_b[[*key, "modality", "topk_experts"]]
    merged = left.merge(right, on=key, how="outer", suffixes=("_a", "_b"), indicator=True)
    only_a = int((merged["_merge"] == "left_only").sum())
    only_b = int((merged["_merge"] == "right_only").sum())
    if (only_a or only_b) and not allow_partial:
        raise ValueError(
            f"the two traces cover different tokens: {only_a} (task, sample_id, position, layer) rows "
            f"only in df_a, {only_b} only in df_b; capture both checkpoints on the same samples, or pass "
            "allow_partial=True to compare the common rows"
        )
    merged = merged[merged["_merge"] == "both"].drop(columns="_merge").reset_index(drop=True)
    if len(merged) == 0:
        raise ValueError("the two traces share no (task, sample_id, position, layer) rows")
    if (merged["modality_a"] != merged["modality_b"]).any():
        raise ValueError(
            "aligned tokens have different modality in the two traces; were they tokenised alike?"
        )
    return merged.rename(columns={"modality_a": "modality"}).drop(columns="modality_b")


def switch_overlap(
    df_a: pd.DataFrame, df_b: pd.DataFrame, *, by: Sequence[str] = (), allow_partial: bool = False
) -> pd.DataFrame:
    """How routing of the same tokens differs between two checkpoints, per (*by, layer).

    Rows are aligned on (task, sample_id, position, layer); `by` columns come from df_a (e.g. "modality").
    With A, B the top-K expert sets of a token in checkpoints a and b:
        switch_rate   mean over tokens of [top1_a != top1_b]   (0 for identical routing)
        topk_overlap  mean of |A ∩ B| / K                       (1 for identical routing; the headline number)
        topk_jaccard  mean of |A ∩ B| / |A ∪ B| = |A ∩ B| / (2K - |A ∩ B|)   (equals topk_overlap for K = 1)
    Both traces must have the same K.
    """
    by = list(by)
    merged = _align(df_a, df_b, by, allow_partial)
    topk_a_NK = list_column_matrix(merged["topk_experts_a"], "topk_experts (df_a)")
    topk_b_NK = list_column_matrix(merged["topk_experts_b"], "topk_experts (df_b)")
    k = topk_a_NK.shape[1]
    if topk_b_NK.shape[1] != k:
        raise ValueError(f"df_a has top-{k} routing, df_b top-{topk_b_NK.shape[1]}; overlap needs the same K")
    # experts are distinct within a row, so the pairwise-equality count is |A ∩ B|
    shared_N = (topk_a_NK[:, :, None] == topk_b_NK[:, None, :]).sum(axis=(1, 2))
    measures = pd.DataFrame(
        {
            "switched": topk_a_NK[:, 0] != topk_b_NK[:, 0],
            "overlap": shared_N / k,
            "jaccard": shared_N / (2 * k - shared_N),
        }
    )
    keys = [*by, "layer"]
    grouped = pd.concat([merged[keys], measures], axis=1).groupby(keys, sort=True)
    out = grouped.agg(
        n_tokens=("switched", "size"),
        switch_rate=("switched", "mean"),
        topk_overlap=("overlap", "mean"),
        topk_jaccard=("jaccard", "mean"),
    ).reset_index()
    out["top_k"] = k
    return out


def switch_transitions(
    df_a: pd.DataFrame, df_b: pd.DataFrame, *, by: Sequence[str] = (), allow_partial: bool = False
) -> pd.DataFrame:
    """Where tokens go: counts of top-1 expert e_a in checkpoint a -> e_b in checkpoint b, per (*by, layer).

    Columns: *by, layer, expert_a, expert_b, count, fraction_of_a (count / tokens with top-1 e_a in a).
    Only observed (expert_a, expert_b) pairs are listed.
    """
    by = list(by)
    merged = _align(df_a, df_b, by, allow_partial)
    table = merged[[*by, "layer"]].copy()
    table["expert_a"] = list_column_matrix(merged["topk_experts_a"])[:, 0]
    table["expert_b"] = list_column_matrix(merged["topk_experts_b"])[:, 0]
    out = (
        table.groupby([*by, "layer", "expert_a", "expert_b"], sort=True).size().rename("count").reset_index()
    )
    out["fraction_of_a"] = out["count"] / out.groupby([*by, "layer", "expert_a"])["count"].transform("sum")
    return out


# ------------------------------------------------------------------------------------ specialisation


def nmi(df: pd.DataFrame, label_col: str, *, by: Sequence[str] = ()) -> pd.DataFrame:
    """Normalised mutual information between each token's top-1 expert and a label, per (*by, layer).

    NMI(Y, X) = I(Y; X) / mean(H(Y), H(X)) (arithmetic mean, sklearn's default), X = top-1 expert,
    Y = df[label_col] (e.g. "task", "modality", or an instruction-cluster column joined from
    analysis.clusters). 1: the expert determines the label and vice versa; 0: independent. When both are
    constant sklearn defines NMI = 1; when only one is constant, 0. Columns: *by, layer, n_tokens,
    n_labels, nmi.
    """
    by = list(by)
    if label_col in by:
        raise ValueError(
            f"label_col={label_col!r} is also in by={by}; within one label value NMI is undefined"
        )
    require_columns(df, [*by, "layer", label_col, "topk_experts"], f"nmi against {label_col!r}")
    if df[label_col].isna().any():
        raise ValueError(f"label column {label_col!r} has {int(df[label_col].isna().sum())} missing labels")
    table = df[[*by, "layer", label_col]].copy()
    table["top1"] = _top1(df)
    rows = []
    for key, group in table.groupby([*by, "layer"], sort=True):
        key = key if isinstance(key, tuple) else (key,)
        score = normalized_mutual_info_score(group[label_col].to_numpy(), group["top1"].to_numpy())
        rows.append((*key, len(group), group[label_col].nunique(), float(score)))
    return pd.DataFrame(rows, columns=[*by, "layer", "n_tokens", "n_labels", "nmi"])


__all__ = [
    "ALIGN_KEY",
    "TOKEN_KEY",
    "conflict_curves",
    "conflict_summary",
    "cosine_histogram",
    "expert_loading",
    "nmi",
    "pathways",
    "read_conflict_curves",
    "read_metrics_jsonl",
    "routing_stats",
    "switch_overlap",
    "switch_transitions",
    "token_paths",
    "top_paths",
]
