"""The real tiny MoE-LLaVA through ``train``: dense stage 2, sparse upcycling, stage III on a generated mini
suite; every checkpoint folder loads on its own with the Auto classes after ``import stgc``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import stgc  # noqa: F401  (registers the model with the Auto classes)
from stgc.recipes import apply_overrides, get_recipe
from stgc.train import parameter_groups, read_metrics, set_trainable, train


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    from stgc.data.suite import generate_suite

    out = tmp_path_factory.mktemp("data") / "mini"
    generate_suite(
        out, docs=1, train_size=24, image_size=64, vocab_size=400, benchmarks=["gqa", "scienceqa_img"]
    )
    return out


def _tiny(recipe: str, suite: Path, out: Path, *overrides: str):
    return apply_overrides(
        get_recipe(recipe),
        [
            f"data.train={suite / 'train'}",
            f"data.tokenizer={suite / 'tokenizer'}",
            "training.max_steps=2",
            "training.batch_size=4",
            "training.save_steps=2",
            "training.measure_conflict_every=1",
            f"output_dir={out}",
            *overrides,
        ],
    )


def test_dense_stage_then_upcycled_stage3_checkpoints_load(suite, tmp_path):
    dense = train(_tiny("tiny_dense", suite, tmp_path / "dense", "model.vision_init=scratch"))
    assert json.loads((dense / "config.json").read_text())["model_type"] == "llava"
    config = _tiny("tiny_stgc", suite, tmp_path / "stgc", f"model.init={dense}", "training.grad_accum=2")
    final = train(config)
    assert final.name == "checkpoint-2" and (final / "run_config.json").exists()

    model = AutoModelForImageTextToText.from_pretrained(final)
    processor = AutoProcessor.from_pretrained(final)
    assert type(model).__name__ == "MoELlavaForConditionalGeneration"
    method = model.config.routing_method
    assert method["name"] == "stgc" and method["objectives"][1]["beta"] == 0.01
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id

    # stage III trained experts, routers and the projector only: everything else is the dense parent's
    parent = AutoModelForImageTextToText.from_pretrained(dense).state_dict()
    groups = parameter_groups(model)
    for name, tensor in model.state_dict().items():
        if groups.get(name) in ("vision", "embeddings", "attention", "norms", "lm_head", "mlp"):
            assert torch.equal(tensor, parent[name]), name

    records = read_metrics(final.parent)
    assert [r["step"] for r in records] == [1, 2]
    layers = sorted(model.config.moe_layers)
    for r in records:
        for layer in layers:
            for key in ("fraction", "mean_cos", "pairs", "cel"):
                assert f"conflict/layer{layer}/{key}" in r
            assert f"routing/layer{layer}/imbalance" in r and f"routing/layer{layer}/entropy" in r
        assert r["loss/cel_scaled"] == pytest.approx(0.01 * r["loss/cel"])


def test_parameter_groups_of_the_tiny_model():
    from tests.conftest import tiny_model

    model = tiny_model("phi")
    groups = set(parameter_groups(model).values())
    assert groups == {
        "experts",
        "router",
        "projector",
        "vision",
        "embeddings",
        "attention",
        "norms",
        "lm_head",
        "mlp",
    }
    counts = set_trainable(model, "experts,router,projector", ("experts", "router", "projector"))
    assert set(counts) == {"experts", "router", "projector"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        ("experts" in n or "router" in n or "multi_modal_projector" in n) for n in trainable
    )


def test_z_loss_run_logs_every_term_scaled_and_unscaled(suite, tmp_path):
    """The worked example of docs/extending.md: a tiny run with [load_balance, z_loss] logs both terms,
    unscaled and scaled by their coefficients, and the total is L_lm plus the scaled terms."""
    dense = train(_tiny("tiny_dense", suite, tmp_path / "dense", "model.vision_init=scratch"))
    config = _tiny("tiny_z_loss", suite, tmp_path / "z", f"model.init={dense}", "method.z_loss.coef=0.01")
    assert [o.name for o in config.method.objectives] == ["load_balance", "z_loss"]
    train(config)
    records = read_metrics(tmp_path / "z")
    assert len(records) == 2
    for r in records:
        assert r["loss/z"] > 0 and r["loss/aux"] > 0
        assert r["loss/z_scaled"] == pytest.approx(0.01 * r["loss/z"])
        assert r["loss/aux_scaled"] == pytest.approx(0.01 * r["loss/aux"])
        total = r["loss/lm"] + r["loss/aux_scaled"] + r["loss/z_scaled"]
        assert r["loss/total"] == pytest.approx(total, rel=1e-6)


def test_fused_stgc_under_activation_checkpointing_matches():
    """The MoE-LLaVA recipes checkpoint activations (non-reentrant): the recomputed forward runs outside the
    routing context, yet the backward keeps the original nodes and their observer, so the fused gradients
    and conflict statistics are unchanged."""
    from stgc.config import MoEConfig
    from stgc.objectives.config import STGCConfig
    from tests.conftest import image_batch, tiny_model
    from tests.toy_moe import objectives

    model = tiny_model("llama").train()
    batch = image_batch(model, batch=2, text_len=8)
    batch["labels"] = batch["input_ids"].clone()

    def run(checkpointing: bool):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        model.zero_grad()
        result = objectives(STGCConfig(beta=0.5), MoEConfig()).step_loss(model, batch, 0)
        result.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return grads, result.logs(), len(result.records)

    (g0, logs0, n0), (g1, logs1, n1) = run(False), run(True)
    assert n0 == n1 == len(model.config.moe_layers)
    assert logs0 == logs1 and logs0["loss/cel"] > 0
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name
