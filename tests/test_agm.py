"""AGM on image vs text tokens (stgc.objectives.agm): alpha 0 is the baseline bit for bit, kappa moves as the
formula says when one modality dominates, the lite hook scales each modality's gradient, the running means
survive a resume, the faithful mode's gradient, text-only data is one clear error."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from stgc.config import MoEConfig
from stgc.moe import RoutingContext
from stgc.objectives.agm import AGM, agm_kappa, answer_score, shapley
from stgc.objectives.base import StepInputs, TrainingData
from stgc.objectives.config import AGMConfig, LoadBalanceConfig, MethodConfig
from stgc.objectives.set import ObjectiveSet
from tests.conftest import image_batch, tiny_model

MOE = MoEConfig()


def _method(**agm) -> ObjectiveSet:
    return ObjectiveSet(MethodConfig(name="agm", objectives=(LoadBalanceConfig(), AGMConfig(**agm))), MOE)


def _batch(model, seed: int = 0) -> dict:
    batch = image_batch(model, batch=3, text_len=10, seed=seed, pad_right=2)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, : labels.shape[1] - 6] = -100  # image and instruction unlabelled, the last words the answer
    return {**batch, "labels": labels}


def _grads(model, method, batch):
    model.zero_grad(set_to_none=True)
    result = method.step_loss(model, batch, 0)
    result.loss.backward()
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_alpha_zero_is_bit_identical_to_baseline():
    model = tiny_model().train()
    batch = _batch(model)
    base, g_base = _grads(model, ObjectiveSet(MethodConfig(), MOE), batch)
    agm, g_agm = _grads(model, _method(alpha=0.0), batch)
    assert torch.equal(base.loss, agm.loss)
    assert g_base.keys() == g_agm.keys() and len(g_base) > 50
    assert all(torch.equal(g_base[n], g_agm[n]) for n in g_base)
    # the same step with alpha 1 modulates: the comparison can fail
    method = _method(alpha=1.0)
    on, g_on = _grads(model, method, batch)
    k = method.metrics(on)
    assert k["agm/kappa_I"] != 1.0 and k["agm/kappa_T"] != 1.0
    assert torch.equal(on.loss, base.loss)  # the forward is the baseline's; only gradients move
    assert not all(torch.equal(g_base[n], g_on[n]) for n in g_base)


def _scored_logits(labels_BS: torch.Tensor, confident: float, V: int = 7) -> torch.Tensor:
    """Logits whose label logit is ``confident`` above the others (0 everywhere else)."""
    logits = torch.zeros(*labels_BS.shape, V)
    target = labels_BS.roll(-1, dims=1).clamp_min(0)  # position t predicts label t + 1
    return logits.scatter(-1, target[..., None], confident)


def test_kappa_moves_as_the_formula_says_when_the_image_dominates(monkeypatch):
    """A batch built so that the image decides the answer: f(I,0) (instruction zeroed) predicts as well as
    f(I,T), f(0,T) (image zeroed) is uninformative. Then s_I < s_T, r_I > rbar_I and kappa_I < 1 < kappa_T,
    with exactly AGM's values; the running means update after kappa, and restore on resume."""
    B, S, image_id = 2, 6, 5
    ids = torch.tensor([[image_id, image_id, 1, 2, 3, 4]] * B)
    labels = torch.full((B, S), -100)
    labels[:, 4:] = 3
    full = _scored_logits(labels, 4.0)
    mono = {"image": torch.zeros_like(full), "text": full.clone()}  # zeroing the image loses everything

    def mono_logits(self, model, inputs, zero_BS):
        return mono["image" if bool(zero_BS[:, 0].all()) else "text"]

    monkeypatch.setattr(AGM, "_mono_logits", mono_logits)
    model = SimpleNamespace(config=SimpleNamespace(image_token_id=image_id))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    step = StepInputs(
        model, RoutingContext(), SimpleNamespace(logits=full), torch.zeros(()), 0, {}, None, inputs
    )
    agm = AGM(AGMConfig(alpha=1.0), MOE)
    assert agm.before_backward(step, None) == {}
    phi_I, phi_T = shapley(full, mono["image"], mono["text"])
    s_I, s_T = float(answer_score(phi_I, labels)), float(answer_score(phi_T, labels))
    assert s_I < s_T  # the image player explains the answer
    m = agm.metrics([], None)
    assert m["agm/s_I"] == pytest.approx(s_I) and m["agm/s_T"] == pytest.approx(s_T)
    # first batch: running means 0, rbar = 1; kappa_m = exp(min(1 - r_m, 10))
    assert m["agm/kappa_I"] == pytest.approx(math.exp(1 - math.exp(s_T - s_I)))
    assert m["agm/kappa_T"] == pytest.approx(math.exp(1 - math.exp(s_I - s_T)))
    assert m["agm/kappa_I"] < 1 < m["agm/kappa_T"]
    assert m["agm/sbar_I"] == pytest.approx(s_I) and m["agm/sbar_T"] == pytest.approx(s_T)

    # second batch where the text dominates instead: rbar (from the first batch) against the new ratios
    mono["image"], mono["text"] = full.clone(), torch.zeros_like(full)
    saved = agm.state_dict()
    agm.before_backward(step, None)
    m2 = agm.metrics([], None)
    want = agm_kappa(s_T, s_I, s_I, s_T, 1.0, 10.0)  # the scores swap, the means are the first batch's
    assert (m2["agm/kappa_I"], m2["agm/kappa_T"]) == pytest.approx(want)
    assert m2["agm/kappa_T"] < 1 < m2["agm/kappa_I"]
    assert m2["agm/sbar_I"] == pytest.approx((s_I + s_T) / 2)
    # resume: a fresh objective with the saved state computes the same second step
    resumed = AGM(AGMConfig(alpha=1.0), MOE)
    resumed.load_state_dict(saved)
    resumed.before_backward(step, None)
    assert resumed.metrics([], None) == m2
    # the cap: exp(alpha * min(rbar - r, cap))
    assert agm_kappa(50.0, 0.0, 0.0, 50.0, 1.0, 10.0)[0] == pytest.approx(math.exp(10.0))


def test_lite_hook_scales_each_modality_gradient():
    agm = AGM(AGMConfig(), MOE)
    agm.kappa = {"image": 2.0, "text": 0.5}
    h = torch.randn(2, 4, 3, requires_grad=True)
    modality = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    out = agm.context(0)["input_hook"](0, h, RoutingContext(modality_BT=modality))
    assert torch.equal(out, h)
    out.backward(torch.ones_like(h))
    want = torch.where(modality == 1, 2.0, 0.5)[..., None].expand_as(h)
    assert torch.equal(h.grad, want)


def test_faithful_mode_gradient_is_the_baseline_at_alpha_zero_and_moves_with_alpha():
    model = tiny_model().train()
    batch = _batch(model, seed=1)
    _, g_base = _grads(model, ObjectiveSet(MethodConfig(), MOE), batch)
    zero, g_zero = _grads(model, _method(alpha=0.0, mode="faithful"), batch)
    # L_lm(out) - L_lm(f(I,T)): out is f(I,T) up to rounding
    assert abs(float(zero.terms["agm"].detach())) < 1e-5
    for name in g_base:
        torch.testing.assert_close(g_zero[name], g_base[name], rtol=1e-4, atol=1e-6)
    _, g_one = _grads(model, _method(alpha=1.0, mode="faithful"), batch)
    assert any((g_one[n] - g_base[n]).abs().max() > 1e-4 for n in g_base)


def test_text_only_batches_train_unmodulated_and_text_only_data_is_one_clear_error():
    """A text-only batch of mixed data (LLaVA-665K's text rows) has one player: kappa 1, the baseline's
    gradients, no update of the running means, counted. A training set without any image is refused."""
    from datasets import Dataset

    model = tiny_model().train()
    batch = _batch(model)
    image = batch["input_ids"] == model.config.image_token_id
    text = {**batch, "input_ids": batch["input_ids"].masked_fill(image, 6)}
    text.pop("pixel_values")
    _, g_base = _grads(model, ObjectiveSet(MethodConfig(), MOE), text)
    method = _method(alpha=1.0)
    _grads(model, method, batch)  # an image batch first: kappa != 1 from here on
    assert method.items[1].kappa["text"] != 1.0
    result, g_agm = _grads(model, method, text)
    assert all(torch.equal(g_base[n], g_agm[n]) for n in g_base)
    assert method.metrics(result) == {"agm/kappa_I": 1.0, "agm/kappa_T": 1.0, "agm/text_only_batch": 1.0}
    assert method.state_dict()["agm"]["batches"] == 1

    conversations = [[{"from": "human", "value": "what is it ?"}, {"from": "gpt", "value": "a square"}]] * 3
    rows = Dataset.from_dict({"id": ["a", "b", "c"], "conversations": conversations})
    with pytest.raises(ValueError, match=r"none of the 3 training rows has an image: text-only data"):
        AGM(AGMConfig(), MOE).before_epoch(0, TrainingData(model, rows, None))
