"""Every peer-II preset (mole, roma, agm), alone and with STGC, runs one training step from synthetic inputs
(random weights, random token ids with image tokens) as a step benchmark does: ``ObjectiveSet``,
``synthetic_setup`` (RoMA's neighbour cache), ``step_loss``, backward; every term finite and logged."""

from __future__ import annotations

import math

import pytest
import torch

from stgc.modeling import MoELlavaForConditionalGeneration
from stgc.objectives.set import ObjectiveSet
from stgc.recipes import get_recipe
from stgc.trainer import set_trainable
from tests.conftest import image_batch, tiny_dense_llava

RECIPES = ["tiny_mole", "tiny_mole_stgc", "tiny_roma", "tiny_roma_stgc", "tiny_agm", "tiny_agm_stgc"]
TERMS = {"mole": "loss/mole_bal", "roma": "loss/roma", "agm": "agm/kappa_I"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_one_synthetic_step(recipe):
    config = get_recipe(recipe)
    dense = tiny_dense_llava()
    model = MoELlavaForConditionalGeneration.from_dense(dense, config.model.moe, config.method.to_dict())
    model.train()
    set_trainable(model, config.training.trainable, config.training.trainable_groups())
    batch = image_batch(model, batch=4, text_len=8, pad_right=2)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :-5] = -100
    batch["labels"] = labels
    method = ObjectiveSet(config.method, config.model.moe)
    method.check(model.config.moe_layers)
    method.prepare(max_steps=1, moe_layers=model.config.moe_layers, seed=0)
    method.synthetic_setup(model, batch)
    result = method.step_loss(model, batch, 0)
    result.loss.backward()
    logs = {**result.logs(), **method.metrics(result)}
    assert all(math.isfinite(v) for k, v in logs.items() if k.startswith(("loss/", "agm/", "roma/"))), logs
    assert TERMS[config.method.name.split("+")[0]] in logs
    if recipe.endswith("_stgc"):
        assert "loss/cel" in logs and "conflict/fraction" in logs
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
