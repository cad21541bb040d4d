"""RoMA (stgc.objectives.roma): only routers change, the regulariser is zero when every neighbour routes
identically, neighbours and weights follow the definition, the stage's preparation runs over the training
set (correct samples, embeddings, per-epoch cache), and a checkpoint without enough correctly answered
samples is one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import stgc.objectives.roma as roma_mod
from stgc.data.answers import normalise_answer
from stgc.objectives.base import TrainingData
from stgc.objectives.config import RoMAConfig
from stgc.objectives.roma import (
    RoMA,
    alignment,
    batch_keys,
    last_prompt_positions,
    neighbour_graph,
    routing_vectors,
)
from stgc.objectives.set import ObjectiveSet
from stgc.recipes import get_recipe
from stgc.trainer import parameter_groups, set_trainable
from tests.conftest import image_batch, tiny_model

RECIPE = get_recipe("tiny_roma")


def test_preset_is_a_router_only_stage_on_the_tiny_checkpoint():
    assert RECIPE.training.trainable == "router" and RECIPE.model.init == "recipe:tiny"
    assert [o.name for o in RECIPE.method.objectives] == ["roma"]
    assert get_recipe("tiny_roma_stgc").model.init == "recipe:tiny"


def test_neighbours_are_the_nearest_correct_samples_with_gaussian_weights():
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, -0.5]])
    correct = torch.tensor([0, 1, 2, 4])  # sample 3 is answered wrongly: never a neighbour
    nbr, w, sigma = neighbour_graph(emb, correct, k=2)
    positions = correct[nbr]
    assert positions[0].tolist() == [4, 1]  # itself excluded
    assert positions[3].tolist() == [1, 0]
    assert 3 not in positions.flatten().tolist()
    d = torch.cdist(emb, emb)
    dists = torch.stack([d[i, positions[i]] for i in range(5)])
    assert sigma == pytest.approx(float(dists.flatten().median()))
    want = torch.exp(-dists.square() / (2 * sigma**2))
    torch.testing.assert_close(w, want / want.sum(1, keepdim=True))
    # fewer candidates than k for a correct sample: the missing neighbour has weight 0
    nbr1, w1, _ = neighbour_graph(emb[:2], torch.tensor([0, 1]), k=2)
    assert nbr1[0].tolist() == [1, -1] and w1[0].tolist() == [1.0, 0.0]


def test_last_prompt_token_is_before_the_first_answer_token():
    labels = torch.tensor([[-100, -100, -100, 7, 8, -100], [-100, -100, -100, -100, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    assert last_prompt_positions(labels, mask).tolist() == [2, 3]  # no answer left: the last real token
    assert normalise_answer(" The Two.") == normalise_answer("2") == "2"


def _batch(model, identical: bool):
    batch = image_batch(model, batch=4, text_len=8, seed=3)
    if identical:
        batch = {k: v[:1].expand_as(v).clone() for k, v in batch.items()}
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100
    return {**batch, "labels": labels}


def test_regulariser_is_zero_when_every_neighbour_routes_identically_and_only_routers_change():
    model = tiny_model().train()
    method = ObjectiveSet(RECIPE.method, RECIPE.model.moe)
    method.prepare(max_steps=1, moe_layers=model.config.moe_layers, seed=0)
    same = _batch(model, identical=True)  # every sample, so every neighbour, routes as sample i does
    method.synthetic_setup(model, same)
    assert float(method.step_loss(model, same, 0).terms["roma"].detach()) == 0.0
    other = _batch(model, identical=False)
    method.synthetic_setup(model, other)
    result = method.step_loss(model, other, 0)
    assert float(result.terms["roma"].detach()) > 1e-6 and result.coefficients["roma"] == 1.0

    set_trainable(model, RECIPE.training.trainable, RECIPE.training.trainable_groups())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.zero_grad(set_to_none=True)
    method.step_loss(model, other, 0).loss.backward()
    optimizer.step()
    groups = parameter_groups(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and {groups[n] for n in changed} == {"router"}
    assert changed == {n for n, g in groups.items() if g == "router"}


# ---------------------------------------------------------------------------------------------------------
# the stage's preparation on real training rows


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    from stgc.data.suite import generate_suite

    out = tmp_path_factory.mktemp("data") / "mini"
    generate_suite(out, docs=1, train_size=12, image_size=64, vocab_size=400, benchmarks=["scienceqa_img"])
    return out


def _data(suite: Path):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from stgc.data.collate import LlavaCollator
    from stgc.modeling import build_model, build_processor

    tok = AutoTokenizer.from_pretrained(suite / "tokenizer")
    torch.manual_seed(0)
    model = build_model(
        "llama", "tiny", vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id, moe=RECIPE.model.moe,
    )  # fmt: skip
    vision = model.config.vision_config
    collator = LlavaCollator(build_processor(tok, vision.image_size, vision.patch_size), max_length=192)
    return TrainingData(model.train(), load_from_disk(str(suite / "train"))["train"], collator)


def _roma(data: TrainingData, **settings) -> RoMA:
    objective = RoMA(RoMAConfig(**settings), RECIPE.model.moe)
    objective.prepare(max_steps=1, moe_layers=data.model.config.moe_layers, seed=0)
    return objective


def test_too_few_correctly_answered_samples_is_one_clear_error(suite, monkeypatch):
    data = _data(suite)
    # a random model answers nothing: the real judge (greedy generation, exact match after normalisation)
    with pytest.raises(ValueError, match=r"answers none of the 12 training samples correctly"):
        _roma(data).before_epoch(0, data)
    assert data.model.training  # the judge restored the training mode

    def two_correct(model, rows, processor, batch_size, max_new_tokens):
        return np.arange(len(rows)) < 1  # the first row of each batch of 4: 3 in all

    monkeypatch.setattr(roma_mod, "answers_correctly", two_correct)
    with pytest.raises(ValueError, match=r"answers 3 of the 12 .* fewer than roma.k=4.* at most 3"):
        _roma(data, k=4, judge_batch_size=4).before_epoch(0, data)


def test_preparation_finds_neighbours_among_correct_samples_and_refreshes_the_cache(suite, monkeypatch):
    data = _data(suite)

    def every_other(model, rows, *args):  # per judged batch of 5: its rows 0, 2, 4
        return np.arange(len(rows)) % 2 == 0

    def fake_embed(texts, model=None):  # a deterministic stand-in for MiniLM (tested with the analysis)
        e = np.random.default_rng(len(texts)).normal(size=(len(texts), 8)).astype(np.float32)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    monkeypatch.setattr(roma_mod, "answers_correctly", every_other)
    monkeypatch.setattr("stgc.embeddings.embed_instructions", fake_embed)
    objective = _roma(data, judge_batch_size=5)
    objective.before_epoch(0, data)
    N = len(data.dataset)
    assert N == 12 and objective.correct_C.tolist() == [i for i in range(N) if (i % 5) % 2 == 0]
    assert objective.neighbours_NK.shape == (N, 3) and (objective.neighbours_NK >= 0).all()
    assert objective.cache_CD.shape == (objective.correct_C.numel(), len(objective.layers) * 4)
    # every training batch's samples are found by content
    batch = data.collator([data.dataset[i] for i in (3, 0, 7)])
    assert [objective.index[k] for k in batch_keys(batch["input_ids"], batch["attention_mask"])] == [3, 0, 7]
    # the same epoch keeps its cache; a new epoch recomputes it with the current model
    cache = objective.cache_CD.clone()
    with torch.no_grad():
        for block in data.model.moe_blocks.values():
            block.router.weight.add_(0.5)
    objective.before_epoch(0, data)
    assert torch.equal(objective.cache_CD, cache)
    objective.before_epoch(1, data)
    assert objective.cache_epoch == 1 and not torch.equal(objective.cache_CD, cache)
    # state round-trip (a resumed run keeps its graph and cache)
    restored = _roma(data)
    restored.load_state_dict(objective.state_dict())
    assert torch.equal(restored.neighbours_NK, objective.neighbours_NK) and restored.index == objective.index
    # the regulariser of a training batch: the definition, with the cached neighbours
    with torch.no_grad():
        out = data.model(**batch, output_routing=True)
    r = routing_vectors(out.routing_records, objective.layers, last_prompt_positions(batch["labels"], None))
    idx = torch.tensor([3, 0, 7])
    cache, nbr, w = objective.cache_CD, objective.neighbours_NK, objective.weights_NK
    got = alignment(r, nbr[idx], w[idx], cache)
    manual = sum(
        float(w[i, j]) * float((r[b] - cache[nbr[i, j]]).square().sum())
        for b, i in enumerate(idx.tolist())
        for j in range(3)
    )
    assert float(got.detach()) == pytest.approx(manual / 3, rel=1e-5)
