"""Routing metrics on hand-built tables with known answers, for several E, K and image-token counts."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis.metrics import (
    conflict_curves,
    conflict_summary,
    cosine_histogram,
    expert_loading,
    nmi,
    pathways,
    read_conflict_curves,
    read_metrics_jsonl,
    routing_stats,
    switch_overlap,
    switch_transitions,
    token_paths,
    top_paths,
)
from analysis.schema import traces_from_arrays
from tests.test_analysis_synthetic import make_traces

CONFIGS = [(8, 1, 16), (4, 2, 16), (8, 1, 576), (4, 2, 576)]  # (E, K, image tokens)


@pytest.mark.parametrize(("num_experts", "top_k", "num_image_tokens"), CONFIGS)
def test_uniform_routing(num_experts, top_k, num_image_tokens):
    # 16 + 8 + 8 tokens per sample: a multiple of E, so the rotating assignment is exactly balanced
    df = make_traces(
        num_experts=num_experts,
        top_k=top_k,
        num_image_tokens=num_image_tokens,
        num_text_tokens=8,
        num_answer_tokens=8,
        routing="uniform",
    )
    stats = routing_stats(df)
    assert np.allclose(stats["mean_entropy"], math.log(num_experts), atol=1e-6)
    assert np.allclose(stats["mean_entropy_normalised"], 1.0, atol=1e-6)
    assert np.allclose(stats["mean_margin"], 0.0, atol=1e-6)
    assert np.allclose(stats["top1_cv"], 0.0)
    assert np.allclose(stats["top1_max_over_mean"], 1.0)
    assert (stats["n_unused_experts"] == 0).all()
    loading = expert_loading(df, num_experts)
    everything = loading[loading["modality"] == "all"]
    assert np.allclose(everything["share_in_modality"], 1.0 / num_experts)
    assert np.allclose(everything["share_of_tokens"], 1.0 / num_experts)


@pytest.mark.parametrize(("num_experts", "top_k", "num_image_tokens"), CONFIGS)
def test_all_tokens_on_one_expert(num_experts, top_k, num_image_tokens):
    df = make_traces(
        num_experts=num_experts, top_k=top_k, num_image_tokens=num_image_tokens, routing="one_expert"
    )
    stats = routing_stats(df)
    tokens = len(df) // 2  # two MoE layers
    counts = np.array([tokens] + [0] * (num_experts - 1), dtype=float)
    cv_by_hand = counts.std() / counts.mean()  # = sqrt(E - 1)
    assert cv_by_hand == pytest.approx(math.sqrt(num_experts - 1))
    assert np.allclose(stats["top1_cv"], cv_by_hand)
    assert np.allclose(stats["top1_max_over_mean"], num_experts)
    assert (stats["n_unused_experts"] == num_experts - 1).all()
    assert (stats["top1_min_share"] == 0).all()
    assert (stats["n_tokens"] == tokens).all()
    assert (stats["mean_margin"] > 0.4).all()  # p_(1) - p_(2) >= 0.46 from logits 10, 9, ~0

    loading = expert_loading(df, num_experts)
    top1 = loading[(loading["selection"] == "top1") & (loading["modality"] == "all")]
    assert len(top1) == 2 * num_experts  # experts with no token are listed, with 0
    assert top1.set_index(["layer", "expert"])["share_of_tokens"].unstack().iloc[:, 0].eq(1.0).all()
    topk = loading[(loading["selection"] == "topk") & (loading["modality"] == "image")]
    expected = np.array([1.0 / top_k] * top_k + [0.0] * (num_experts - top_k))
    assert np.allclose(topk[topk["layer"] == 1]["share_in_modality"], expected)
    assert np.allclose(topk[topk["layer"] == 1]["token_fraction"], (expected > 0).astype(float))


def _hand_table(rows, num_experts=4):
    """rows: (sample_id, position, modality, layer, [experts...]) -> trace table with peaked probs."""
    experts_NK = np.array([r[4] for r in rows])
    probs_NE = np.full((len(rows), num_experts), 0.01)
    for i, experts in enumerate(experts_NK):
        probs_NE[i, experts] = np.linspace(0.9, 0.5, len(experts))
    probs_NE /= probs_NE.sum(axis=1, keepdims=True)
    return traces_from_arrays(
        sample_id=[r[0] for r in rows],
        task="t",
        position=[r[1] for r in rows],
        modality=[r[2] for r in rows],
        layer=[r[3] for r in rows],
        topk_experts_NK=experts_NK,
        topk_weights_NK=np.full(experts_NK.shape, 1.0 / experts_NK.shape[1]),
        probs_NE=probs_NE,
    )


def test_expert_loading_hand_counts():
    # layer 2: 3 image tokens on experts 0, 0, 1 and 1 text token on expert 3 (top-1 only)
    df = _hand_table(
        [
            ("s", 0, "image", 2, [0]),
            ("s", 1, "image", 2, [0]),
            ("s", 2, "image", 2, [1]),
            ("s", 3, "text", 2, [3]),
        ]
    )
    loading = expert_loading(df, 4).query("selection == 'top1'").set_index(["modality", "expert"])
    assert loading.loc[("image", 0), "count"] == 2
    assert loading.loc[("image", 0), "share_in_modality"] == pytest.approx(2 / 3)
    assert loading.loc[("image", 0), "share_of_tokens"] == pytest.approx(2 / 4)
    assert loading.loc[("text", 3), "share_in_modality"] == pytest.approx(1.0)
    assert loading.loc[("text", 3), "share_of_tokens"] == pytest.approx(1 / 4)
    assert loading.loc[("all", 2), "count"] == 0
    per_modality = loading.drop(index="all", level="modality")
    assert per_modality["share_of_tokens"].sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="num_experts=3"):
        expert_loading(df, 3)


def test_pathways_hand_built():
    # 4 text tokens over layers 1 and 5 (rows given out of order on purpose):
    # paths (0,1), (0,1), (1,1), (2,0)
    rows = [
        ("a", 0, "text", 5, [1]),
        ("a", 0, "text", 1, [0]),
        ("a", 1, "text", 1, [0]),
        ("a", 1, "text", 5, [1]),
        ("b", 0, "text", 1, [1]),
        ("b", 0, "text", 5, [1]),
        ("b", 1, "text", 1, [2]),
        ("b", 1, "text", 5, [0]),
    ]
    df = _hand_table(rows)
    paths = token_paths(df)
    assert paths["path"].tolist() == [(0, 1), (0, 1), (1, 1), (2, 0)]
    stats = pathways(df, top_n=1).set_index("modality").loc["text"]
    assert stats["n_tokens"] == 4
    assert stats["num_layers"] == 2
    assert stats["n_distinct_paths"] == 3
    assert stats["path_entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert stats["top_n_coverage"] == pytest.approx(0.5)
    top = top_paths(df, top_n=3).query("modality == 'text'")
    assert top["path"].tolist() == [(0, 1), (1, 1), (2, 0)]  # count ties broken by the path's expert ids
    assert top["count"].tolist() == [2, 1, 1]
    assert top["path_label"].iloc[0] == "0>1"
    assert top["layers"].iloc[0] == (1, 5)
    with pytest.raises(ValueError, match="not traced in all 2 MoE layers"):
        token_paths(df.iloc[1:])


@pytest.mark.parametrize(("num_experts", "top_k", "num_image_tokens"), CONFIGS)
def test_pathways_one_expert_and_random(num_experts, top_k, num_image_tokens):
    one = pathways(
        make_traces(
            num_experts=num_experts, top_k=top_k, num_image_tokens=num_image_tokens, routing="one_expert"
        )
    )
    assert (one["n_distinct_paths"] == 1).all() and np.allclose(one["path_entropy"], 0.0)
    assert np.allclose(one["top_n_coverage"], 1.0)
    moe_layers = (0, 2, 4)
    df = make_traces(
        num_experts=num_experts, top_k=top_k, num_image_tokens=num_image_tokens, moe_layers=moe_layers
    )
    stats = pathways(df, top_n=5)
    every = stats.set_index("modality").loc["all"]
    assert every["n_tokens"] == 2 * (num_image_tokens + 12)
    assert every["n_distinct_paths"] <= min(every["n_tokens"], num_experts ** len(moe_layers))
    assert 0 < every["path_entropy"] <= math.log(every["n_distinct_paths"]) + 1e-9
    top = top_paths(df, top_n=5)
    assert top.groupby("modality")["frequency"].sum().le(1 + 1e-9).all()
    assert all(len(path) == 3 for path in top["path"])


@pytest.mark.parametrize(("num_experts", "top_k", "num_image_tokens"), CONFIGS)
def test_switch_overlap(num_experts, top_k, num_image_tokens):
    df = make_traces(num_experts=num_experts, top_k=top_k, num_image_tokens=num_image_tokens)
    same = switch_overlap(df, df.sample(frac=1.0, random_state=0))  # row order must not matter
    assert np.allclose(same["switch_rate"], 0.0)
    assert np.allclose(same["topk_overlap"], 1.0) and np.allclose(same["topk_jaccard"], 1.0)
    # consecutive experts (t, t+1, ...) shifted by one: every top-1 switches; the sets share K-1 experts
    df = make_traces(
        num_experts=num_experts, top_k=top_k, num_image_tokens=num_image_tokens, routing="uniform"
    )
    shifted = df.assign(topk_experts=[(np.asarray(e) + 1) % num_experts for e in df["topk_experts"]])
    moved = switch_overlap(df, shifted, by=["modality"])
    assert np.allclose(moved["switch_rate"], 1.0)
    assert np.allclose(moved["topk_overlap"], (top_k - 1) / top_k)
    assert np.allclose(moved["topk_jaccard"], (top_k - 1) / (top_k + 1))
    transitions = switch_transitions(df, shifted)
    assert ((transitions["expert_b"] - transitions["expert_a"]) % num_experts == 1).all()
    assert np.allclose(transitions["fraction_of_a"], 1.0)


def test_switch_overlap_refuses_different_tokens():
    df = make_traces()
    with pytest.raises(ValueError, match=r"4 .* only in df_a, 0 only in df_b.*allow_partial=True"):
        switch_overlap(df, df.iloc[4:])
    partial = switch_overlap(df, df.iloc[4:], allow_partial=True)
    assert partial["n_tokens"].sum() == len(df) - 4
    with pytest.raises(ValueError, match="same K"):
        switch_overlap(df, make_traces(top_k=1))


@pytest.mark.parametrize(("num_experts", "top_k", "num_image_tokens"), CONFIGS)
def test_nmi(num_experts, top_k, num_image_tokens):
    special = make_traces(
        num_experts=num_experts, top_k=top_k, num_image_tokens=num_image_tokens, routing="modality"
    )
    assert np.allclose(nmi(special, "modality")["nmi"], 1.0)
    one = make_traces(
        num_experts=num_experts, top_k=top_k, num_image_tokens=num_image_tokens, routing="one_expert"
    )
    assert np.allclose(nmi(one, "modality")["nmi"], 0.0)
    per_task = nmi(pd.concat([special, special.assign(task="other")]), "modality", by=["task"])
    assert len(per_task) == 4 and np.allclose(per_task["nmi"], 1.0)
    with pytest.raises(ValueError, match="cluster"):
        nmi(special, "cluster")


def test_metrics_jsonl_and_conflict_curves(tmp_path):
    run = tmp_path / "stgc-seed0"
    run.mkdir()
    records = [
        {"step": 10, "method": "stgc", "loss/total": 2.0, "conflict/layer1/fraction": 0.4,
         "conflict/layer1/mean_cos": 0.1, "conflict/3/fraction": 0.3, "conflict/all/fraction": 0.35,
         "conflict/fraction": 0.35, "conflict/layer_3/expert2/mean_cos": 0.2, "note": "text", "flag": True},
        {"step": 20, "method": "stgc", "conflict/layer1/fraction": 0.2},
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in records) + "\n\n" + '{"step": 30, "conf'
    )
    with pytest.warns(UserWarning, match="truncated last line"):
        long = read_metrics_jsonl(run / "metrics.jsonl")
    assert set(long["run"]) == {"stgc-seed0"} and set(long["method"]) == {"stgc"}
    assert "note" not in set(long["key"]) and "flag" not in set(long["key"])
    curves = conflict_curves(long).set_index(["step", "scope", "stat"])
    assert curves.loc[(10, "layer1", "fraction"), "layer"] == 1
    assert curves.loc[(10, "3", "fraction"), "layer"] == 3
    assert curves.loc[(10, "layer_3", "expert2/mean_cos"), "layer"] == 3
    assert pd.isna(curves.loc[(10, "all", "fraction"), "layer"])
    assert pd.isna(curves.loc[(10, "", "fraction"), "layer"])
    assert curves.loc[(20, "layer1", "fraction"), "value"] == pytest.approx(0.2)
    assert len(curves) == 7

    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 is not valid JSON"):
        read_metrics_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "nostep.jsonl").write_text('{"loss": 1.0}\n')
    with pytest.raises(ValueError, match="integer 'step'"):
        read_metrics_jsonl(tmp_path / "nostep.jsonl")
    with pytest.warns(UserWarning, match="truncated"):
        both = read_conflict_curves([run / "metrics.jsonl"] * 2, runs=["a", "b"], methods=[None, "baseline"])
    assert set(both["run"]) == {"a", "b"} and set(both["method"]) == {"stgc"}  # the record's method wins


def test_conflict_summary_and_histogram():
    rng = np.random.default_rng(0)
    scores = pd.DataFrame({"layer": np.repeat([1, 3], 500), "expert": np.tile(np.arange(4), 250)})
    scores["score"] = np.clip(rng.normal(0.2, 0.4, len(scores)), -1, 1)
    scores["conflict"] = scores["score"] < 0
    summary = conflict_summary(scores)
    assert summary["n_scores"].tolist() == [500, 500]
    expected = scores.groupby("layer")["conflict"].mean().to_numpy()
    assert np.allclose(summary["conflict_fraction"], expected)
    hist = cosine_histogram(scores, bins=20)
    per_layer = hist.groupby("layer")
    assert per_layer["count"].sum().tolist() == [500, 500]
    assert np.allclose(per_layer["fraction"].sum(), 1.0)
    assert np.allclose(hist.assign(area=hist["density"] * 0.1).groupby("layer")["area"].sum(), 1.0)
    considered = scores.assign(considered=scores["layer"] == 1)
    assert conflict_summary(considered)["layer"].tolist() == [1]
    assert cosine_histogram(considered, bins=20)["count"].sum() == 500
    with pytest.raises(ValueError, match="outside value_range"):
        cosine_histogram(scores.assign(score=scores["score"] * 3))
    with pytest.raises(ValueError, match="boolean"):
        conflict_summary(scores.assign(conflict=scores["conflict"].astype(int)))
