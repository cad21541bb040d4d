"""`stgc analyze capture / conflict / routing` on tiny random checkpoints and a generated mini suite: valid
trace files with the right modalities and token counts for any E / top-k, batch-independent routing,
refusal to overwrite, conflict scores, one-line CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from analysis.capture import capture_routing
from analysis.conflict_probe import conflict_on_checkpoint, read_conflict_scores
from analysis.metrics import conflict_summary, cosine_histogram
from analysis.schema import META_KEY, SCHEMA_VERSION_KEY, read_traces, validate_traces
from stgc.cli import main

TASKS = ["scienceqa_img", "stgc_textvqa_val"]  # a benchmark name and a task name
MAX_NEW = 5


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    from stgc.data import generate_suite

    root = tmp_path_factory.mktemp("suite") / "mini"
    generate_suite(
        root, docs=3, train_size=24, image_size=64, benchmarks=["scienceqa_img", "textvqa"], vocab_size=300
    )
    return root


def _checkpoint(path, suite, num_experts: int, top_k: int, seed: int = 7):
    import torch
    from transformers import AutoTokenizer

    from stgc.backbones import vision_config
    from stgc.config import MoEConfig
    from stgc.modeling import build_model, build_processor

    tok = AutoTokenizer.from_pretrained(str(suite / "tokenizer"))
    torch.manual_seed(0)
    model = build_model(
        "llama",
        "tiny",
        vocab_size=len(tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
        # E8k1 with three adjacent MoE layers, E4k2 with the default (every other layer)
        moe=MoEConfig(num_experts=num_experts, top_k=top_k, layers=(1, 2, 3) if top_k == 1 else None),
        routing_method={"name": "stgc", "tau": 0.0} if top_k == 2 else None,
    )
    vision = vision_config("tiny")
    processor = build_processor(tok, vision.image_size, vision.patch_size)
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    (path / "run_config.json").write_text(json.dumps({"training": {"seed": seed}}))
    return path, model.config, processor


@pytest.fixture(scope="module", params=[(8, 1), (4, 2)], ids=["E8k1", "E4k2"])
def checkpoint(request, tmp_path_factory, suite):
    num_experts, top_k = request.param
    return _checkpoint(
        tmp_path_factory.mktemp(f"ckpt{num_experts}") / "checkpoint-0", suite, num_experts, top_k
    )


def test_capture_writes_a_valid_trace(checkpoint, suite, tmp_path):
    path, config, processor = checkpoint
    out = capture_routing(
        path, TASKS, tmp_path / "t.parquet", data_root=suite, batch_size=2, max_new_tokens=MAX_NEW
    )
    df, meta = read_traces(out)
    E, K = config.moe["num_experts"], config.moe["top_k"]
    validate_traces(df, num_experts=E, top_k=K)
    assert (meta["num_experts"], meta["top_k"]) == (E, K)
    assert meta["moe_layers"] == list(config.moe_layers) == sorted(df["layer"].unique().tolist())
    assert meta["method"] == config.routing_method["name"] and meta["seed"] == 7
    assert meta["samples_per_task"] == {"stgc_scienceqa_img": 3, "stgc_textvqa_val": 3}
    # the processor's image-token count, however the vision tower is sized
    expanded = processor(text="<image>", images=Image.new("RGB", (64, 64)))["input_ids"][0]
    n_image = int(sum(1 for t in expanded if t == config.image_token_id))
    assert n_image == (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    assert meta["image_tokens_per_sample"] == n_image
    counts = df.groupby(["task", "sample_id", "layer", "modality"]).size().unstack(fill_value=0)
    assert (counts["image"] == n_image).all() and (counts["text"] > 5).all()
    assert ((counts["answer"] >= 1) & (counts["answer"] <= MAX_NEW)).all()
    for (_, _, _), token in df.groupby(["task", "sample_id", "layer"]):
        token = token.sort_values("position")
        assert token["position"].tolist() == list(range(len(token)))  # no padding, no gaps
        image = token.loc[token["modality"] == "image", "position"].to_numpy()
        assert (np.diff(image) == 1).all()  # one contiguous image run
        answer = token["modality"].to_numpy() == "answer"
        assert answer[-answer.sum() :].all()  # the answer ends the sequence

    if K == 1:
        return
    # routing does not depend on the batch: batch 1 gives the same traces as batch 2
    single = capture_routing(
        path, TASKS, tmp_path / "b1.parquet", data_root=suite, batch_size=1, max_new_tokens=MAX_NEW, limit=2
    )
    one, _ = read_traces(single)
    key = ["task", "sample_id", "position", "layer"]
    both = one.merge(df, on=key, suffixes=("_1", "_2"))
    assert len(both) == len(one) and (both["modality_1"] == both["modality_2"]).all()
    assert all((a == b).all() for a, b in zip(both["topk_experts_1"], both["topk_experts_2"]))
    probs_gap = max(np.abs(a - b).max() for a, b in zip(both["probs_1"], both["probs_2"]))
    assert probs_gap < 1e-4


def test_refuses_to_overwrite(checkpoint, suite, tmp_path, capsys):
    path, _, _ = checkpoint
    out = tmp_path / "t.parquet"
    out.write_bytes(b"old")
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        capture_routing(path, TASKS, out, data_root=suite)
    assert out.read_bytes() == b"old"
    code = main(
        ["analyze", "capture", str(path), "--tasks", *TASKS, "--out", str(out), "--data-root", str(suite)]
    )
    assert code == 2 and "already exists" in capsys.readouterr().err


def test_conflict_scores(checkpoint, suite, tmp_path):
    path, config, _ = checkpoint
    out = conflict_on_checkpoint(path, suite / "train", tmp_path / "c.parquet", batches=2, batch_size=2)
    scores = read_conflict_scores([out])
    E = config.moe["num_experts"]
    assert set(scores["layer"]) == set(config.moe_layers) and scores["expert"].between(0, E - 1).all()
    assert set(scores["modality"]) == {"image", "text", "answer"} and set(scores["batch"]) == {0, 1}
    assert scores["method"].iloc[0] == config.routing_method["name"] and scores["seed"].iloc[0] == 7
    assert not (scores["conflict"] & ~scores["considered"]).any()
    # every real token routed to K experts in every MoE layer
    per_token = scores.groupby(["batch", "sample_id", "position", "layer"]).size()
    assert (per_token == config.moe["top_k"]).all()
    summary = conflict_summary(scores, by=("method", "layer"))
    assert len(summary) == len(config.moe_layers) and summary["conflict_fraction"].between(0, 1).all()
    assert len(cosine_histogram(scores, by=("method",))) == 40
    with pytest.raises(ValueError, match="already exists"):
        conflict_on_checkpoint(path, suite / "train", out)


def test_cli_routing_tables_and_errors(checkpoint, suite, tmp_path, capsys):
    path, _, _ = checkpoint
    trace = tmp_path / "t.parquet"
    assert main(
        ["analyze", "capture", str(path), "--tasks", "scienceqa_img", "--out", str(trace), "--data-root",
         str(suite), "--limit", "2", "--max-new-tokens", "3"]
    ) == 0  # fmt: skip
    assert main(["analyze", "routing", str(trace), "--out", str(tmp_path / "tables")]) == 0
    loading = pd.read_csv(tmp_path / "tables" / "expert_loading.csv")
    assert {"method", "seed", "task", "layer", "modality", "expert", "share_in_modality"} <= set(
        loading.columns
    )
    for name in ("routing_stats", "pathways", "top_paths", "nmi_task", "nmi_modality"):
        assert len(pd.read_csv(tmp_path / "tables" / f"{name}.csv"))
    capsys.readouterr()

    def one_line_error(argv) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    assert "does not exist" in one_line_error(
        [
            "analyze",
            "capture",
            str(tmp_path / "nope"),
            "--tasks",
            "stgc_gqa",
            "--out",
            str(tmp_path / "x.parquet"),
        ]
    )
    assert "unknown task or benchmark 'nonsense'" in one_line_error(
        ["analyze", "capture", str(path), "--tasks", "nonsense", "--out", str(tmp_path / "x.parquet")]
    )
    assert "must be a .parquet file" in one_line_error(
        ["analyze", "capture", str(path), "--tasks", "stgc_gqa", "--out", str(tmp_path / "x.csv")]
    )
    # a trace file from another schema version: the error names the file
    table = pq.read_table(trace)
    metadata = dict(table.schema.metadata)
    metadata[SCHEMA_VERSION_KEY] = b"999"
    old = tmp_path / "old.parquet"
    pq.write_table(table.replace_schema_metadata({**metadata, META_KEY: metadata[META_KEY]}), old)
    message = one_line_error(["analyze", "routing", str(old), "--out", str(tmp_path / "t2")])
    assert str(old) in message and "schema version 999" in message
    assert "already exist" in one_line_error(
        ["analyze", "routing", str(trace), "--out", str(tmp_path / "tables")]
    )
    assert "--data" in one_line_error(
        [
            "analyze",
            "conflict",
            str(path),
            "--data",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "c.parquet"),
        ]
    )


def test_trace_writer_streams_what_write_traces_writes(tmp_path):
    from analysis.capture import TraceWriter
    from analysis.schema import write_traces
    from tests.test_analysis_synthetic import make_traces, trace_meta

    batches = [make_traces(task=task, moe_layers=(1, 3)) for task in ("a", "b")]
    writer = TraceWriter(tmp_path / "s.parquet", num_experts=4, top_k=2, moe_layers=(1, 3))
    for batch in batches:
        writer.write(batch)
    assert not (tmp_path / "s.parquet").exists()  # only a hidden temporary file until close
    streamed, meta = read_traces(writer.close(trace_meta(), overwrite=False))
    whole, whole_meta = read_traces(
        write_traces(pd.concat(batches), tmp_path / "w.parquet", meta=trace_meta())
    )
    pd.testing.assert_frame_equal(streamed, whole.reset_index(drop=True))
    assert meta == whole_meta
    assert writer.image_tokens == {("a", "a-0"): 16, ("a", "a-1"): 16, ("b", "b-0"): 16, ("b", "b-1"): 16}

    aborted = TraceWriter(tmp_path / "x.parquet", num_experts=4, top_k=2, moe_layers=(1, 3))
    aborted.write(batches[0])
    aborted.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.parquet", "w.parquet"]
    with pytest.raises(ValueError, match="top_k=1"):
        TraceWriter(tmp_path / "y.parquet", num_experts=4, top_k=1, moe_layers=(1, 3)).write(batches[0])
