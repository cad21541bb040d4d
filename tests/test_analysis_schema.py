"""Trace files: round trip, metadata, refusals with clear messages."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from analysis.schema import (
    META_KEY,
    SCHEMA_VERSION_KEY,
    TRACE_COLUMNS,
    TRACE_SCHEMA,
    TRACE_SCHEMA_VERSION,
    read_trace_meta,
    read_traces,
    validate_traces,
    write_traces,
)
from tests.test_analysis_synthetic import make_traces, trace_meta


@pytest.mark.parametrize(("num_experts", "top_k", "num_image_tokens"), [(8, 1, 16), (4, 2, 576)])
def test_round_trip(tmp_path, num_experts, top_k, num_image_tokens):
    df = make_traces(num_experts=num_experts, top_k=top_k, num_image_tokens=num_image_tokens)
    meta = {**trace_meta(num_experts, top_k), "git_revision": "abc123"}
    path = write_traces(df, tmp_path / "routing" / "traces.parquet", meta=meta)
    back, back_meta = read_traces(path)
    assert pq.read_schema(path).remove_metadata().equals(TRACE_SCHEMA)
    assert back_meta == {**meta, "schema_version": TRACE_SCHEMA_VERSION}
    assert list(back.columns) == list(TRACE_COLUMNS)
    assert back["sample_id"].tolist() == df["sample_id"].tolist()
    assert np.array_equal(np.stack(back["topk_experts"]), np.stack(df["topk_experts"]))
    assert np.allclose(np.stack(back["probs"]), np.stack(df["probs"]))
    validate_traces(back, num_experts=num_experts, top_k=top_k)
    subset, _ = read_traces(path, columns=["layer", "topk_experts"])
    assert list(subset.columns) == ["layer", "topk_experts"]


def test_refuses_overwrite(tmp_path):
    df = make_traces()
    path = write_traces(df, tmp_path / "t.parquet", meta=trace_meta())
    with pytest.raises(ValueError, match=r"t\.parquet already exists.*overwrite=True"):
        write_traces(df, path, meta=trace_meta())
    write_traces(df, path, meta=trace_meta(), overwrite=True)


def test_version_mismatch_names_file_and_versions(tmp_path):
    df = make_traces()
    path = write_traces(df, tmp_path / "old.parquet", meta=trace_meta())
    table = pq.read_table(path)
    table = table.replace_schema_metadata({**table.schema.metadata, SCHEMA_VERSION_KEY: b"0"})
    pq.write_table(table, path)
    with pytest.raises(
        ValueError, match=r"old\.parquet was written with trace schema version 0.*version 1.*capture"
    ):
        read_traces(path)


def test_foreign_parquet_and_missing_columns(tmp_path):
    df = make_traces()
    foreign = tmp_path / "foreign.parquet"
    df.drop(columns=["probs", "topk_weights", "topk_experts"]).to_parquet(foreign)
    with pytest.raises(ValueError, match="foreign.parquet has no stgc_trace_schema_version"):
        read_traces(foreign)
    path = write_traces(df, tmp_path / "t.parquet", meta=trace_meta())
    table = pq.read_table(path).drop_columns(["entropy"])
    pq.write_table(table, tmp_path / "cut.parquet")
    with pytest.raises(ValueError, match=r"cut\.parquet lacks trace columns \['entropy'\]"):
        read_trace_meta(tmp_path / "cut.parquet")
    meta_only = json.loads(pq.read_schema(path).metadata[META_KEY])
    assert meta_only["num_experts"] == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda df, m: df.drop(columns="entropy"), "missing columns"),
        (lambda df, m: df.assign(modality="video"), "unknown modality"),
        (lambda df, m: df.assign(entropy=df["entropy"] / np.log(2)), "nats"),
        (lambda df, m: df.iloc[[0, 0]], "duplicated"),
        (lambda df, m: df.assign(topk_experts=[np.array([5, 1])] * len(df)), r"values must be in \[0, 4\)"),
        (lambda df, m: df.assign(topk_experts=[np.array([1, 1])] * len(df)), "repeated expert"),
    ],
)
def test_validate_rejects(tmp_path, change, message):
    df = make_traces()
    with pytest.raises(ValueError, match=message):
        write_traces(change(df, trace_meta()), tmp_path / "bad.parquet", meta=trace_meta())


def test_meta_checked_against_rows(tmp_path):
    df = make_traces(num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="missing"):
        write_traces(df, tmp_path / "a.parquet", meta={"num_experts": 4})
    with pytest.raises(ValueError, match="top_k=1"):
        write_traces(df, tmp_path / "a.parquet", meta=trace_meta(top_k=1))
    with pytest.raises(ValueError, match="num_experts=8"):
        write_traces(df, tmp_path / "a.parquet", meta=trace_meta(num_experts=8))
    with pytest.raises(ValueError, match=r"layers \[3\] that are not in moe_layers"):
        write_traces(df, tmp_path / "a.parquet", meta=trace_meta(moe_layers=(1,)))
    assert not (tmp_path / "a.parquet").exists()
