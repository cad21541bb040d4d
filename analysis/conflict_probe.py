"""Token gradient conflict of a trained checkpoint, measured on a few batches of a training set.

    conflict_on_checkpoint("runs/tiny-stgc-seed0/checkpoint-200", "data/mini/train",
                           "results/<sweep>/conflict/stgc-seed0.parquet")
    stgc analyze conflict runs/tiny-stgc-seed0/checkpoint-200 --data data/mini/train \
        --out results/<sweep>/conflict/stgc-seed0.parquet

The training curves (`metrics.jsonl`) hold only per-layer means; the cosine distribution of docs/method.md
section 6 needs every (token, expert) score. This runs the same measurement as training (`stgc.conflict.
ConflictObserver` inside each MoE layer's backward, as the `stgc` objective wires it) on a fixed,
seeded selection of rows, so checkpoints of different methods are scored on the same tokens. The model is
in eval mode (deterministic top-k routing, no second-expert sampling) and nothing is updated. The loss
back-propagated is the language-modelling loss: the load-balancing loss depends on the router logits only,
so it does not reach the expert biases whose gradients are scored. The score and threshold are the
checkpoint's STGC settings (`score`, `tau`) when it was trained with STGC, else the ConflictObserver
defaults (the same the trainer measures a baseline with); arguments override both.

Score file (Parquet), one row per routed (token, expert) assignment of a real (non-padding) token:
    batch        int32   index of the batch (0 .. batches-1)
    sample_id    string  the row's `id` in the dataset (its index when it has none)
    position     int32   token index in the model input (image tokens spliced in)
    modality     string  "image", "text" (prompt) or "answer" (a token with a training label)
    layer        int16   decoder-layer index of the MoE layer
    expert       int16   the expert of the assignment
    score        float32 cosine of the token's gradient with its expert's mean gradient (docs/method.md 3)
    considered   bool    entered the conflict test (both gradients and the expert mean non-zero)
    conflict     bool    considered and score < tau
File metadata b"stgc_conflict_meta": JSON with checkpoint, method, seed, num_experts, top_k, moe_layers,
score, tau, data, batches, batch_size, sample_seed, git_revision, date. `read_conflict_scores` reads one or
more files and adds method / seed / checkpoint columns; `analysis.metrics.conflict_summary` and
`cosine_histogram` take the result.

Shape legend: B batch, S sequence length, A routed assignments (expert-sorted), T = B*S tokens.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.capture import check_out_path, checkpoint_meta

CONFLICT_META_KEY = b"stgc_conflict_meta"
CONFLICT_SCHEMA = pa.schema(
    [
        pa.field("batch", pa.int32(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("expert", pa.int16(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("considered", pa.bool_(), nullable=False),
        pa.field("conflict", pa.bool_(), nullable=False),
    ]
)
IGNORE_INDEX = -100  # stgc.data.collate.IGNORE_INDEX (not imported: it loads torch)


def _load_rows(data: str | os.PathLike, num_rows: int, seed: int):
    """`num_rows` rows of a training set folder (save_to_disk; a DatasetDict's "train" split or its only
    split), chosen by a seeded permutation; fewer when the set is smaller."""
    from datasets import DatasetDict, load_from_disk

    folder = Path(data)
    if not folder.is_dir():
        raise ValueError(
            f"--data {folder} does not exist; pass a training set folder such as data/mini/train"
        )
    from stgc.data.suite import check_generated_suite

    check_generated_suite(folder)  # a suite of another generator version: refused, with the fix
    try:
        dataset = load_from_disk(str(folder))
    except Exception as error:  # datasets raises several types for a folder it cannot read
        raise ValueError(f"--data {folder} is not a dataset saved with save_to_disk ({error})") from None
    if isinstance(dataset, DatasetDict):
        if "train" in dataset:
            dataset = dataset["train"]
        elif len(dataset) == 1:
            dataset = next(iter(dataset.values()))
        else:
            raise ValueError(f"--data {folder} has splits {sorted(dataset)} and no 'train'; pass one split")
    missing = [c for c in ("image", "conversations") if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"--data {folder} lacks columns {missing}; conflict needs LLaVA-style training rows "
            "(image, conversations), e.g. data/mini/train"
        )
    order = np.random.default_rng(seed).permutation(len(dataset))[:num_rows]
    from stgc.data.validate import check_training_rows

    rows = dataset.select(order.tolist())
    check_training_rows(rows, f"--data {folder}")
    return rows


def _observer_settings(
    routing_method: dict[str, Any], score: str | None, tau: float | None
) -> dict[str, Any]:
    from stgc.conflict import ConflictObserver
    from stgc.objectives.config import objective_params

    defaults = ConflictObserver()
    own = objective_params(routing_method, "stgc") or {}
    return {
        "score": score if score is not None else own.get("score", defaults.score),
        "tau": float(tau if tau is not None else own.get("tau", defaults.tau)),
    }


def batch_conflict_rows(
    batch: dict, observer, *, image_token_id: int, sample_ids: Sequence[str]
) -> pd.DataFrame:
    """Score rows of one batch from a ConflictObserver that kept its tensors (after the backward)."""
    ids_BS = batch["input_ids"].cpu().numpy()
    real_BS = batch["attention_mask"].cpu().numpy().astype(bool)
    labelled_BS = batch["labels"].cpu().numpy() != IGNORE_INDEX
    B, S = ids_BS.shape
    modality_BS = np.where(labelled_BS, "answer", "text").astype(object)
    modality_BS[ids_BS == image_token_id] = "image"
    sample_ids = np.asarray(sample_ids, dtype=object)
    pieces = []
    for layer, result in sorted(observer.layers.items()):
        token_A = result.token_A.cpu().numpy()
        b_A, s_A = token_A // S, token_A % S
        real_A = real_BS[b_A, s_A]
        b_A, s_A = b_A[real_A], s_A[real_A]
        pieces.append(
            pd.DataFrame(
                {
                    "sample_id": sample_ids[b_A],
                    "position": s_A.astype(np.int32),
                    "modality": modality_BS[b_A, s_A],
                    "layer": np.int16(layer),
                    "expert": result.expert_A.cpu().numpy()[real_A].astype(np.int16),
                    "score": result.score_A.detach().float().cpu().numpy()[real_A],
                    "considered": result.considered_A.cpu().numpy()[real_A].astype(bool),
                    "conflict": result.conflict_A.cpu().numpy()[real_A].astype(bool),
                }
            )
        )
    return pd.concat(pieces, ignore_index=True)


def conflict_on_checkpoint(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    batches: int = 4,
    batch_size: int = 8,
    max_length: int = 2048,
    sample_seed: int = 0,
    score: str | None = None,
    tau: float | None = None,
    overwrite: bool = False,
    device: str | None = None,
    seed: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write the per-(token, expert) conflict scores of `checkpoint` on `batches` x `batch_size` rows of the
    training set `data` to `out` (see the module docstring); return the path.

    sample_seed picks the rows (the same rows for every checkpoint with the same seed); seed is the
    training seed for the metadata when the checkpoint has no run_config.json."""
    say = log or (lambda _msg: None)
    out = check_out_path(out, overwrite)
    if batches < 1 or batch_size < 1:
        raise ValueError(f"batches={batches} and batch_size={batch_size} must both be >= 1")
    from evals.checkpoint import check_checkpoint

    path = check_checkpoint(checkpoint)
    rows = _load_rows(data, batches * batch_size, sample_seed)

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import stgc  # noqa: F401  (registers the model with the Auto classes)
    from stgc.conflict import ConflictObserver
    from stgc.data.collate import LlavaCollator
    from stgc.moe import RoutingContext
    from stgc.provenance import git_revision

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModelForImageTextToText.from_pretrained(str(path)).to(device).eval()
    processor = AutoProcessor.from_pretrained(str(path))
    collate = LlavaCollator(processor, max_length=max_length)
    meta = checkpoint_meta(path, model.config, seed)
    settings = _observer_settings(meta["routing_method"], score, tau)
    image_token_id = int(model.config.image_token_id)
    ids = [str(i) for i in rows["id"]] if "id" in rows.column_names else [str(i) for i in range(len(rows))]
    pieces = []
    for b, start in enumerate(range(0, len(rows), batch_size)):
        chunk = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        observer = ConflictObserver(**settings, scale=0.0)  # measure only
        observer.skip_weight_grads = True  # token gradients only: no weight gradient is needed
        ctx = RoutingContext(records=[], observer=observer)
        with torch.enable_grad():
            output = model(**batch, routing_ctx=ctx)
            output.loss.backward()
        model.zero_grad(set_to_none=True)
        if not observer.layers:
            raise RuntimeError(f"batch {b}: the conflict observer saw no MoE layer backward")
        piece = batch_conflict_rows(
            batch, observer, image_token_id=image_token_id, sample_ids=ids[start : start + len(chunk)]
        )
        piece.insert(0, "batch", np.int32(b))
        pieces.append(piece)
        say(f"batch {b}: {len(piece)} scored assignments, {int(piece['conflict'].sum())} conflicting")
    scores = pd.concat(pieces, ignore_index=True)
    meta.update(
        settings,
        data=str(data),
        batches=batches,
        batch_size=batch_size,
        sample_seed=sample_seed,
        max_length=max_length,
        git_revision=git_revision(),
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    return write_conflict_scores(scores, out, meta=meta, overwrite=overwrite)


def write_conflict_scores(
    scores: pd.DataFrame, path: str | os.PathLike, *, meta: dict[str, Any], overwrite: bool = False
) -> Path:
    """Write a score table (CONFLICT_SCHEMA columns) with its metadata; refuses to replace a file unless
    `overwrite`."""
    path = check_out_path(path, overwrite)
    missing = [c for c in CONFLICT_SCHEMA.names if c not in scores.columns]
    if missing:
        raise ValueError(f"conflict scores lack columns {missing}; expected {CONFLICT_SCHEMA.names}")
    for key in ("checkpoint", "method", "seed"):
        if key not in meta:
            raise ValueError(f"conflict score metadata needs {key!r}")
    table = pa.Table.from_pandas(scores[CONFLICT_SCHEMA.names], schema=CONFLICT_SCHEMA, preserve_index=False)
    table = table.replace_schema_metadata({CONFLICT_META_KEY: json.dumps(meta, sort_keys=True).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")
    return path


def read_conflict_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"conflict score file {path} does not exist; write it with `stgc analyze conflict`")
    from analysis.schema import parquet_call

    rerun = "re-run `stgc analyze conflict` on the checkpoint"
    metadata = parquet_call(path, "conflict score file", rerun, pq.read_schema).metadata or {}
    if CONFLICT_META_KEY not in metadata:
        raise ValueError(
            f"{path} has no {CONFLICT_META_KEY.decode()} metadata: it was not written by "
            "`stgc analyze conflict`; re-run it on the checkpoint"
        )
    return json.loads(metadata[CONFLICT_META_KEY].decode())


def read_conflict_scores(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Score files concatenated, with method, seed, checkpoint and file columns from their metadata."""
    if not paths:
        raise ValueError("no conflict score files given")
    tables = []
    for path in paths:
        meta = read_conflict_meta(path)
        from analysis.schema import parquet_call

        rerun = "re-run `stgc analyze conflict` on the checkpoint"
        table = parquet_call(Path(path), "conflict score file", rerun, pq.read_table).to_pandas()
        missing = [c for c in CONFLICT_SCHEMA.names if c not in table.columns]
        if missing:
            raise ValueError(f"{path} lacks conflict columns {missing}; re-run `stgc analyze conflict`")
        table.insert(0, "method", meta["method"])
        table.insert(1, "seed", pd.array([meta["seed"]] * len(table), dtype="Int64"))
        table.insert(2, "checkpoint", meta["checkpoint"])
        table.insert(3, "file", Path(path).name)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)
