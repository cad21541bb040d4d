"""The routing-trace table: one row per (sample, token position, MoE layer), stored as Parquet.

`analysis.capture` writes it once per checkpoint (the expensive step); everything in `analysis.metrics`
reads it (the cheap step, run many times), following OLMoE's dump-once / analyse-many split.

Columns (all non-null)
----------------------
sample_id     string        id of the evaluation sample (unique within a task)
task          string        benchmark / task name the sample comes from, e.g. "scienceqa_img"
position      int32         token index in the model's input sequence, after the image tokens are
                            spliced in (so image tokens occupy a contiguous run of positions)
modality      string        "image" (a visual token), "text" (prompt / instruction token) or
                            "answer" (a token of the generated or teacher-forced answer)
layer         int16         decoder-layer index of the MoE layer (not the rank among MoE layers), one
                            of the file's `moe_layers`
topk_experts  list<int16>   the K selected experts, ordered by combine weight, largest first;
                            values in [0, E), distinct within a row
topk_weights  list<float32> the K combine weights, aligned with `topk_experts` (whatever the router
                            multiplies expert outputs by: renormalised or not, as the model does)
probs         list<float32> softmax over all E experts of the router logits (sums to 1)
entropy       float32       routing entropy in nats: H = -sum_e probs[e] * log(probs[e]), 0 log 0 = 0;
                            log(E) for uniform routing

Padding tokens are never written: a trace holds real tokens only.

File-level metadata (Parquet key-value metadata)
------------------------------------------------
b"stgc_trace_schema_version"  ASCII integer, `TRACE_SCHEMA_VERSION` at write time
b"stgc_trace_meta"            UTF-8 JSON object with at least
    num_experts  int          E
    top_k        int          K
    moe_layers   list[int]    decoder-layer indices of all MoE layers of the model, ascending
    checkpoint   str          path or name of the checkpoint the trace was captured from
    method       str          routing method of the checkpoint ("baseline", "stgc", ...)
    seed         int | None   training seed (None for released checkpoints whose seed is unknown)
  and any further JSON-serialisable keys the writer adds (dataset revision, git revision, date ...).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

# Bump when a column is added, removed, renamed or changes meaning; read_traces refuses other versions.
TRACE_SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"stgc_trace_schema_version"
META_KEY = b"stgc_trace_meta"

MODALITIES = ("image", "text", "answer")
REQUIRED_META_KEYS = ("num_experts", "top_k", "moe_layers", "checkpoint", "method", "seed")
KEY_COLUMNS = ("task", "sample_id", "position", "layer")

TRACE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("topk_experts", pa.list_(pa.int16()), nullable=False),
        pa.field("topk_weights", pa.list_(pa.float32()), nullable=False),
        pa.field("probs", pa.list_(pa.float32()), nullable=False),
        pa.field("entropy", pa.float32(), nullable=False),
    ]
)
TRACE_COLUMNS = tuple(TRACE_SCHEMA.names)

_RECAPTURE_HINT = "re-run `stgc analyze capture` on the checkpoint to write a current trace"


def require_columns(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    """ValueError naming the ``columns`` that ``df`` lacks (``what`` names the function that needs them)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs columns {missing}, which the table lacks; it has {list(df.columns)}")


def list_column_matrix(column: pd.Series, name: str | None = None) -> np.ndarray:
    """Stack a list-valued column (one equal-length list per row) into an (N, width) numpy array.

    Raises ValueError naming the column when the rows do not all have the same length.
    """
    name = name or str(column.name)
    values = column.to_numpy()
    if len(values) == 0:
        return np.zeros((0, 0))
    lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    if lengths.min() != lengths.max():
        bad = int(np.flatnonzero(lengths != lengths[0])[0])
        raise ValueError(
            f"column {name!r} must hold lists of one length, but row 0 has {lengths[0]} entries and row "
            f"{bad} has {lengths[bad]}; every token must record the same number of experts"
        )
    return np.concatenate([np.asarray(v) for v in values]).reshape(len(values), int(lengths[0]))


def infer_num_experts(df: pd.DataFrame) -> int:
    """E, read from the length of the `probs` lists (a softmax over all experts)."""
    if len(df) == 0:
        raise ValueError("the trace table is empty; cannot infer the number of experts from `probs`")
    return len(df["probs"].iloc[0])


def infer_top_k(df: pd.DataFrame) -> int:
    """K, read from the length of the `topk_experts` lists."""
    if len(df) == 0:
        raise ValueError("the trace table is empty; cannot infer top-k from `topk_experts`")
    return len(df["topk_experts"].iloc[0])


def routing_entropy(probs_NE: np.ndarray) -> np.ndarray:
    """Entropy in nats of each row of a probability matrix: H = -sum_e p_e log p_e, with 0 log 0 = 0."""
    p = np.asarray(probs_NE, dtype=np.float64)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)


def traces_from_arrays(
    *,
    sample_id: np.ndarray | list,
    task: np.ndarray | list | str,
    position: np.ndarray | list,
    modality: np.ndarray | list | str,
    layer: np.ndarray | list | int,
    topk_experts_NK: np.ndarray,
    topk_weights_NK: np.ndarray,
    probs_NE: np.ndarray,
) -> pd.DataFrame:
    """Build a trace table (TRACE_SCHEMA columns) from flat per-row arrays; entropy is computed from probs.

    N rows, K selected experts, E experts. Scalars for task, modality or layer are broadcast to all rows.
    """
    topk_experts_NK = np.asarray(topk_experts_NK)
    topk_weights_NK = np.asarray(topk_weights_NK, dtype=np.float32)
    probs_NE = np.asarray(probs_NE, dtype=np.float32)
    n = len(probs_NE)
    if topk_experts_NK.ndim != 2 or topk_weights_NK.shape != topk_experts_NK.shape or probs_NE.ndim != 2:
        raise ValueError(
            f"expected topk_experts_NK and topk_weights_NK of shape (N, K) and probs_NE of shape (N, E); got "
            f"{topk_experts_NK.shape}, {topk_weights_NK.shape}, {probs_NE.shape}"
        )
    if len(topk_experts_NK) != n:
        raise ValueError(f"topk_experts_NK has {len(topk_experts_NK)} rows, probs_NE has {n}")

    def broadcast(value, dtype=None) -> np.ndarray:
        array = np.full(n, value) if np.ndim(value) == 0 else np.asarray(value)
        if len(array) != n:
            raise ValueError(f"a per-row array has {len(array)} entries, expected N={n}")
        return array.astype(dtype) if dtype is not None else array

    return pd.DataFrame(
        {
            "sample_id": broadcast(sample_id).astype(str),
            "task": broadcast(task).astype(str),
            "position": broadcast(position, np.int32),
            "modality": broadcast(modality).astype(str),
            "layer": broadcast(layer, np.int16),
            "topk_experts": list(topk_experts_NK.astype(np.int16)),
            "topk_weights": list(topk_weights_NK),
            "probs": list(probs_NE),
            "entropy": routing_entropy(probs_NE).astype(np.float32),
        }
    )


def validate_traces(
    df: pd.DataFrame,
    *,
    num_experts: int | None = None,
    top_k: int | None = None,
    check_values: bool = True,
) -> None:
    """Raise ValueError (with the bad value and the fix) if `df` is not a valid routing-trace table.

    Checks: all columns of TRACE_SCHEMA present; no nulls; modality in MODALITIES; every `topk_experts`
    and `topk_weights` list has K entries and every `probs` list E entries (K, E from the arguments or,
    if None, from the first row); experts in [0, E) and distinct per row; one row per
    (task, sample_id, position, layer). With `check_values`, also that probs sum to 1 (|sum - 1| < 1e-3)
    and that `entropy` equals -sum p log p of `probs` within 1e-3 nats (catches entropy stored in bits).
    """
    missing = [c for c in TRACE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"trace table is missing columns {missing}; it has {list(df.columns)}. A trace needs "
            f"{list(TRACE_COLUMNS)} (see analysis.schema)"
        )
    if len(df) == 0:
        raise ValueError("trace table has no rows; capture at least one sample before analysing")
    nulls = [c for c in TRACE_COLUMNS if df[c].isna().any()]
    if nulls:
        raise ValueError(f"trace columns {nulls} contain nulls; every column of a trace is required")
    bad_modality = sorted(set(df["modality"].unique()) - set(MODALITIES))
    if bad_modality:
        raise ValueError(f"unknown modality values {bad_modality}; use one of {list(MODALITIES)}")

    topk_experts = list_column_matrix(df["topk_experts"])
    topk_weights = list_column_matrix(df["topk_weights"])
    probs = list_column_matrix(df["probs"])
    k, e = topk_experts.shape[1], probs.shape[1]
    if top_k is not None and k != top_k:
        raise ValueError(f"topk_experts lists have {k} entries but top_k={top_k}; pass the model's top_k")
    if num_experts is not None and e != num_experts:
        raise ValueError(
            f"probs lists have {e} entries but num_experts={num_experts}; probs must cover all experts"
        )
    if topk_weights.shape[1] != k:
        raise ValueError(f"topk_weights lists have {topk_weights.shape[1]} entries, topk_experts have {k}")
    if k > e or k < 1:
        raise ValueError(f"top-k={k} must be in [1, num_experts={e}]")
    if topk_experts.min() < 0 or topk_experts.max() >= e:
        raise ValueError(
            f"topk_experts values must be in [0, {e}); found range [{topk_experts.min()}, "
            f"{topk_experts.max()}]"
        )
    if k > 1:
        ordered = np.sort(topk_experts, axis=1)
        if (ordered[:, 1:] == ordered[:, :-1]).any():
            raise ValueError(
                "topk_experts has a repeated expert within a row; the K experts must be distinct"
            )
    duplicated = df.duplicated(list(KEY_COLUMNS))
    if duplicated.any():
        first = df.loc[duplicated, list(KEY_COLUMNS)].iloc[0].to_dict()
        raise ValueError(
            f"{int(duplicated.sum())} duplicated (task, sample_id, position, layer) rows, e.g. {first}; "
            "a trace holds one row per token per MoE layer"
        )
    if check_values:
        sums = probs.sum(axis=1)
        if np.abs(sums - 1).max() > 1e-3:
            raise ValueError(
                f"probs must be a softmax over all experts (sum 1); sums span [{sums.min()}, {sums.max()}]"
            )
        gap = np.abs(routing_entropy(probs) - df["entropy"].to_numpy(dtype=np.float64))
        if gap.max() > 1e-3:
            raise ValueError(
                f"entropy column differs from -sum p log p of probs by up to {gap.max():.4g} nats; "
                "store the entropy of probs in nats (natural log)"
            )


def _validate_meta(meta: Mapping[str, Any], df: pd.DataFrame) -> dict[str, Any]:
    missing = [key for key in REQUIRED_META_KEYS if key not in meta]
    if missing:
        raise ValueError(
            f"trace metadata is missing {missing}; pass meta with keys {list(REQUIRED_META_KEYS)}"
        )
    meta = dict(meta)
    e, k = int(meta["num_experts"]), int(meta["top_k"])
    moe_layers = [int(layer) for layer in meta["moe_layers"]]
    if moe_layers != sorted(set(moe_layers)):
        raise ValueError(f"moe_layers={meta['moe_layers']} must be distinct decoder-layer indices, ascending")
    if meta["seed"] is not None and not isinstance(meta["seed"], int):
        raise ValueError(f"seed={meta['seed']!r} must be an int, or None when the training seed is unknown")
    validate_traces(df, num_experts=e, top_k=k)
    unknown_layers = sorted(set(df["layer"].astype(int).tolist()) - set(moe_layers))
    if unknown_layers:
        raise ValueError(f"trace rows have layers {unknown_layers} that are not in moe_layers={moe_layers}")
    meta.update(num_experts=e, top_k=k, moe_layers=moe_layers)
    return meta


def write_traces(
    df: pd.DataFrame, path: str | Path, *, meta: Mapping[str, Any], overwrite: bool = False
) -> Path:
    """Validate `df` and `meta` and write them as a Parquet trace file; return the path.

    Refuses to replace an existing file unless `overwrite=True` (a capture is expensive; losing one by a
    repeated command is worse than an error).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"trace file {path} already exists; pass overwrite=True to replace it")
    meta = _validate_meta(meta, df)
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except TypeError as error:
        raise ValueError(f"trace metadata must be JSON-serialisable: {error}") from error
    table = pa.Table.from_pandas(df[list(TRACE_COLUMNS)], schema=TRACE_SCHEMA, preserve_index=False)
    table = table.replace_schema_metadata(
        {SCHEMA_VERSION_KEY: str(TRACE_SCHEMA_VERSION).encode(), META_KEY: meta_json.encode()}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")
    return path


def parquet_call(path: Path, what: str, hint: str, read: Any) -> Any:
    """``read(path)`` with a damaged file's pyarrow error turned into a ValueError naming the file (pyarrow's
    own message does not say which file of several it was reading)."""
    try:
        return read(path)
    except (pa.ArrowException, OSError) as err:
        detail = " ".join(str(err).split())
        raise ValueError(f"{what} {path} is not a readable Parquet file ({detail}); {hint}") from None


def read_trace_meta(path: str | Path) -> dict[str, Any]:
    """Read and check only the file-level metadata of a trace file (cheap: no rows are read)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"trace file {path} does not exist (or is a folder); write it with `stgc analyze capture`"
        )
    schema = parquet_call(path, "trace file", _RECAPTURE_HINT, pq.read_schema)
    metadata = schema.metadata or {}
    if SCHEMA_VERSION_KEY not in metadata:
        raise ValueError(
            f"{path} has no {SCHEMA_VERSION_KEY.decode()} metadata, so it was not written by "
            f"analysis.schema.write_traces; {_RECAPTURE_HINT}"
        )
    version = int(metadata[SCHEMA_VERSION_KEY].decode())
    if version != TRACE_SCHEMA_VERSION:
        raise ValueError(
            f"{path} was written with trace schema version {version}, this code reads version "
            f"{TRACE_SCHEMA_VERSION}; {_RECAPTURE_HINT}"
        )
    missing = [c for c in TRACE_COLUMNS if c not in schema.names]
    if missing:
        raise ValueError(f"{path} lacks trace columns {missing}; {_RECAPTURE_HINT}")
    meta = json.loads(metadata[META_KEY].decode()) if META_KEY in metadata else {}
    missing_meta = [key for key in REQUIRED_META_KEYS if key not in meta]
    if missing_meta:
        raise ValueError(f"{path} lacks trace metadata keys {missing_meta}; {_RECAPTURE_HINT}")
    if parquet_call(path, "trace file", _RECAPTURE_HINT, pq.read_metadata).num_rows == 0:
        # every statistic of a trace reduces over its rows: say so here, not as a numpy reduction error
        raise ValueError(
            f"trace file {path} has no rows (no document was captured); {_RECAPTURE_HINT} with documents "
            "(check --tasks and --limit)"
        )
    meta["schema_version"] = version
    return meta


def read_traces(path: str | Path, *, columns: list[str] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a trace file written by `write_traces`; return (table, metadata dict).

    `columns` reads a subset (e.g. without `probs`, the largest column, for loading and pathways).
    List columns come back as object columns holding one numpy array per row.
    """
    meta = read_trace_meta(path)
    if columns is not None:
        unknown = sorted(set(columns) - set(TRACE_COLUMNS))
        if unknown:
            raise ValueError(f"unknown trace columns {unknown}; choose from {list(TRACE_COLUMNS)}")
    df = parquet_call(Path(path), "trace file", _RECAPTURE_HINT, lambda p: pq.read_table(p, columns=columns))
    return df.to_pandas(), meta
