"""Synthetic routing traces with known structure, shared by the analysis tests (plus a builder check)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest

from analysis.schema import traces_from_arrays, validate_traces

ROUTINGS = ("random", "uniform", "one_expert", "modality")


def _chosen_experts(routing: str, modality_T: np.ndarray, num_experts: int, top_k: int, rng) -> np.ndarray:
    """(T, K) distinct expert ids per token, ranked, for one layer."""
    num_tokens = len(modality_T)
    if routing == "random":
        return np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :top_k]
    if routing == "uniform":
        # rotate so every expert gets the same number of slots when T is a multiple of E
        return (np.arange(num_tokens)[:, None] + np.arange(top_k)[None, :]) % num_experts
    if routing == "one_expert":
        return np.tile(np.arange(top_k), (num_tokens, 1))
    if routing == "modality":
        first = np.select([modality_T == "image", modality_T == "text"], [0, 1], 2) % num_experts
        return (first[:, None] + np.arange(top_k)[None, :]) % num_experts
    raise ValueError(f"routing={routing!r}; use one of {ROUTINGS}")


def make_traces(
    *,
    num_experts: int = 4,
    top_k: int = 2,
    moe_layers: Sequence[int] = (1, 3),
    num_samples: int = 2,
    num_image_tokens: int = 16,
    num_text_tokens: int = 8,
    num_answer_tokens: int = 4,
    routing: str = "random",
    task: str = "scienceqa_img",
    seed: int = 0,
) -> pd.DataFrame:
    """A valid trace table: per sample, text prefix of 2 tokens, image tokens, rest of the text, answer."""
    rng = np.random.default_rng(seed)
    modality_T = np.array(
        ["text"] * 2
        + ["image"] * num_image_tokens
        + ["text"] * (num_text_tokens - 2)
        + ["answer"] * num_answer_tokens
    )
    num_tokens = len(modality_T)
    frames = []
    for sample in range(num_samples):
        for layer in moe_layers:
            chosen_TK = _chosen_experts(routing, modality_T, num_experts, top_k, rng)
            if routing == "uniform":
                probs_TE = np.full((num_tokens, num_experts), 1.0 / num_experts)
            else:
                logits_TE = rng.normal(0.0, 0.1, (num_tokens, num_experts))
                rows = np.arange(num_tokens)[:, None]
                logits_TE[rows, chosen_TK] = 10.0 - np.arange(top_k)[None, :]
                probs_TE = np.exp(logits_TE) / np.exp(logits_TE).sum(axis=1, keepdims=True)
            weights_TK = np.take_along_axis(probs_TE, chosen_TK, axis=1)
            weights_TK = weights_TK / weights_TK.sum(axis=1, keepdims=True)
            frames.append(
                traces_from_arrays(
                    sample_id=np.full(num_tokens, f"{task}-{sample}"),
                    task=task,
                    position=np.arange(num_tokens),
                    modality=modality_T,
                    layer=layer,
                    topk_experts_NK=chosen_TK,
                    topk_weights_NK=weights_TK,
                    probs_NE=probs_TE,
                )
            )
    return pd.concat(frames, ignore_index=True)


def trace_meta(num_experts: int = 4, top_k: int = 2, moe_layers: Sequence[int] = (1, 3)) -> dict:
    return {
        "num_experts": num_experts,
        "top_k": top_k,
        "moe_layers": list(moe_layers),
        "checkpoint": "runs/tiny/checkpoint-10",
        "method": "baseline",
        "seed": 0,
    }


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 1), (4, 2)])
def test_builder_makes_valid_traces(routing: str, num_experts: int, top_k: int) -> None:
    df = make_traces(num_experts=num_experts, top_k=top_k, routing=routing)
    validate_traces(df, num_experts=num_experts, top_k=top_k)
    assert len(df) == 2 * 2 * (16 + 8 + 4)
