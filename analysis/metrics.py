"""Routing and gradient-conflict measurements: pure functions DataFrame -> tidy (long) DataFrame.

Inputs are routing-trace tables (analysis.schema: one row per (sample, token, MoE layer)), training
curves from a run's `metrics.jsonl`, or per-(token, expert) conflict-score tables. Nothing here knows a
model size: E comes from an argument or the length of `probs`, K from the length of `topk_experts`,
the MoE layers from the `layer` values, the image tokens from the `modality` column.

Shape legend: N trace rows, T tokens, E experts, K top-k, L MoE layers, G groups.
`by` arguments name extra grouping columns (e.g. ("task",) or ("method", "task") after concatenating
traces of several checkpoints with a `method` column); `layer` is always a grouping key where stated.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import normalized_mutual_info_score

from analysis.schema import infer_num_experts, list_column_matrix

TOKEN_KEY = ("task", "sample_id", "position")
ALIGN_KEY = ("task", "sample_id", "position", "layer")


def _require_columns(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs columns {missing}, which the table lacks; it has {list(df.columns)}")


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
    _require_columns(df, [*by, "layer", "modality", "topk_experts"], "expert_loading")
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
    _require_columns(df, [*token_key, "layer", "modality", "topk_experts"], "token_paths")
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
    _require_columns(df, [*by, "layer", "topk_experts", "probs", "entropy"], "routing_stats")
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
        _require_columns(table, [*key, "modality", "topk_experts"], f"switch_overlap ({name})")
    _require_columns(df_a, extra, "switch_overlap (df_a, `by` columns)")
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
    _require_columns(df, [*by, "layer", label_col, "topk_experts"], f"nmi against {label_col!r}")
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
    _require_columns(metrics, ["run", "method", "step", "key", "value"], "conflict_curves")
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
    _require_columns(scores, [*by, "score", "conflict"], "conflict_summary")
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
    _require_columns(scores, [*by, "score"], "cosine_histogram")
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
