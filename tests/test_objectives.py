"""Objectives (stgc.objectives): equivalences of STGC's modes with each other and with the baseline, the
objective list's contracts (z-loss, one observer, terms scaled and unscaled), and the config layouts.

docs/method.md, "Three ways to compute it": beta = 0 is bit-identical to the baseline; fused == two_pass
when the upstream gradient is the same (one MoE layer); fused masks agree with two_pass masks on nearly all
pairs (the figure is printed: run with -s to see it).
"""

from __future__ import annotations

import pytest
import torch

from stgc.config import MoEConfig
from stgc.conflict import cel_loss
from stgc.objectives.config import METHODS, STGCConfig
from tests.toy_moe import objectives, toy_batch, toy_model

FFNS = ("swiglu", "gelu")
MOE = MoEConfig()


def _grads(model, method, batch, step=0, observer=None):
    model.zero_grad(set_to_none=True)
    result = method.step_loss(model, batch, step, observer="own" if observer is None else observer)
    result.loss.backward()
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_registry_and_build_from_dict():
    assert {"baseline", "stgc", "z_loss"} <= set(METHODS)
    method = objectives({"name": "stgc", "beta": 0.05, "layers": [0]}, MOE)  # the layout before objectives
    stgc = method.items[1].config
    assert method.names == ["load_balance", "stgc"] and stgc.beta == 0.05 and stgc.layers == (0,)
    with pytest.raises(ValueError, match="unknown routing method"):
        objectives({"name": "nope"}, MOE)
    with pytest.raises(ValueError, match="parameter 'betta'"):
        objectives({"name": "stgc", "betta": 0.1}, MOE)


@pytest.mark.parametrize("ffn", FFNS)
@pytest.mark.parametrize("mode", ["fused", "two_pass", "reference"])
def test_beta_zero_is_bit_identical_to_baseline(ffn, mode):
    model = toy_model(ffn, num_layers=2)
    batch = toy_batch(pad=1)
    base, g_base = _grads(model, objectives({"name": "baseline"}, MOE), batch)
    stgc, g_stgc = _grads(model, objectives(STGCConfig(beta=0.0, mode=mode), MOE), batch)
    assert torch.equal(base.loss, stgc.loss)
    assert g_base.keys() == g_stgc.keys() and len(g_base) == len(list(model.parameters()))
    for name in g_base:
        assert torch.equal(g_base[name], g_stgc[name]), name
    # the conflict statistics are still measured (beta = 0 switches the loss off, not the measurement)
    assert "conflict/fraction" in stgc.logs()


@pytest.mark.parametrize("ffn", FFNS)
def test_start_step_turns_the_loss_on_later(ffn):
    model = toy_model(ffn, num_layers=2)
    batch = toy_batch()
    _, g_base = _grads(model, objectives({"name": "baseline"}, MOE), batch)
    method = objectives(STGCConfig(beta=0.5, start_step=3), MOE)
    _, g_early = _grads(model, method, batch, step=2)
    _, g_late = _grads(model, method, batch, step=3)
    assert all(torch.equal(g_base[n], g_early[n]) for n in g_base)
    assert not all(torch.equal(g_base[n], g_late[n]) for n in g_base)


@pytest.mark.parametrize("ffn", FFNS)
def test_fused_equals_two_pass_with_one_moe_layer(ffn):
    """With one MoE layer the fused backward sees the same upstream gradient as two_pass's first pass, so the
    masks are identical and the fused CEL gradient equals autograd's gradient of beta * L_cel."""
    model = toy_model(ffn, num_layers=1)
    batch = toy_batch(batch=4, seq=12, pad=2)
    beta = 0.3
    fused_method = objectives(STGCConfig(beta=beta, mode="fused"), MOE)
    obs = fused_method.observer(0)
    fused, g_fused = _grads(model, fused_method, batch, observer=obs)
    two, g_two = _grads(model, objectives(STGCConfig(beta=beta, mode="two_pass"), MOE), batch)
    lf, lt = fused.observer.layers[0], two.observer.layers[0]
    assert torch.equal(lf.conflict_A, lt.conflict_A) and int(lf.conflict_A.sum()) > 0
    # Router logits are fp32 by design (DeepSpeed's gate): the fused mode adds its logit gradient to the
    # others in another order than autograd does, so gradients agree to fp32 rounding, not fp64.
    for name in g_two:
        torch.testing.assert_close(g_fused[name], g_two[name], rtol=1e-5, atol=1e-7)
    # the CEL value logged by the fused mode is the one two_pass puts into the loss
    torch.testing.assert_close(torch.tensor(fused.logs()["loss/cel"]), two.terms["cel"].detach())
    assert fused.logs()["loss/cel_scaled"] == pytest.approx(beta * fused.logs()["loss/cel"])

    # and the router's extra gradient is exactly beta * dL_cel/dz on the fixed masks
    base, g_base = _grads(model, objectives({"name": "baseline"}, MOE), batch)
    z = base.records[0].logits_TE.detach().requires_grad_(True)
    cel = cel_loss(z, lt.token_A, lt.expert_A, lt.conflict_A, "neg_logit_ce")
    (dz,) = torch.autograd.grad(beta * cel, z)
    x_TD = model.embed_tokens(batch["input_ids"]).reshape(-1, model.config.hidden_size).detach()
    expected_router = g_base["layers.0.router.weight"] + dz.t().to(x_TD.dtype) @ x_TD
    torch.testing.assert_close(g_fused["layers.0.router.weight"], expected_router, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ffn", FFNS)
@pytest.mark.parametrize("loss_scale", [1.0, 0.25, None])
def test_two_pass_gradients_are_those_of_the_total_on_its_masks(ffn, loss_scale):
    """two_pass = one backward of L_lm + alpha L_aux + beta L_cel with the masks of the main loss. Its first
    pass skips what the masks do not need and keeps the last MoE layer's backward for the second pass (same
    upstream gradient); the caller's loss scale (the Trainer's 1/accumulation; ``None``: unknown, fp16)
    must reach that kept backward. Checked against a plain autograd backward of the same objective."""
    model = toy_model(ffn, num_layers=3)
    batch = toy_batch(batch=4, seq=12, pad=2)
    beta, s = 0.3, 1.0 if loss_scale is None else loss_scale
    method = objectives(STGCConfig(beta=beta, mode="two_pass"), MOE)
    obs = method.observer(0)
    obs.loss_scale = loss_scale
    model.zero_grad(set_to_none=True)
    two = method.step_loss(model, batch, 0, observer=obs)
    (two.loss * s).backward()
    g_two = {n: p.grad.clone() for n, p in model.named_parameters()}
    masks = {layer: lc for layer, lc in two.observer.layers.items()}
    assert sum(int(lc.conflict_A.sum()) for lc in masks.values()) > 0

    model.zero_grad(set_to_none=True)
    base = objectives({"name": "baseline"}, MOE).step_loss(model, batch, 0)
    cel = sum(
        cel_loss(r.logits_TE, masks[r.layer_idx].token_A, masks[r.layer_idx].expert_A,
                 masks[r.layer_idx].conflict_A, "neg_logit_ce")
        for r in base.records
    )  # fmt: skip
    ((base.loss + beta * cel) * s).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(g_two[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def mask_agreement(ffn: str, beta: float, seeds=(0, 1, 2), num_layers: int = 4) -> float:
    """Fraction of (token, expert) pairs of every MoE layer whose conflict flag is the same under fused and
    two_pass (same weights, same batch)."""
    agree = total = 0
    for seed in seeds:
        model = toy_model(ffn, num_layers=num_layers, seed=seed, vocab_size=32)
        batch = toy_batch(batch=8, seq=32, vocab_size=32, seed=seed, pad=3)
        method = objectives(STGCConfig(beta=beta, mode="fused"), MOE)
        obs = method.observer(0)
        fused, _ = _grads(model, method, batch, observer=obs)
        two, _ = _grads(model, objectives(STGCConfig(beta=beta, mode="two_pass"), MOE), batch)
        for layer, lt in two.observer.layers.items():
            lf = fused.observer.layers[layer]
            assert torch.equal(lf.token_A, lt.token_A) and torch.equal(lf.expert_A, lt.expert_A)
            agree += int((lf.conflict_A == lt.conflict_A).sum())
            total += lt.conflict_A.numel()
    return agree / total


@pytest.mark.parametrize("ffn", FFNS)
def test_fused_masks_agree_with_two_pass(ffn):
    """Multi-layer: fused upstream gradients carry the later layers' CEL gradients; the masks still agree on
    nearly all pairs at the default beta (0.01); beta = 1 shows how far they can drift."""
    default = mask_agreement(ffn, beta=0.01)
    strong = mask_agreement(ffn, beta=1.0)
    print(
        f"\nfused vs two_pass mask agreement ({ffn}, 4 layers): beta=0.01 {default:.4f}, beta=1 {strong:.4f}"
    )
    # measured (toy, 3 seeds x 4 layers x ~500 pairs): 0.988 / 0.69 (swiglu), 0.989 / 0.69 (gelu)
    assert default > 0.95
    assert strong > 0.5


@pytest.mark.parametrize("form", ["neg_logit_ce", "prob", "min_score"])
def test_every_loss_form_trains_and_logs_scaled_and_unscaled(form):
    model = toy_model("gelu", num_layers=2)
    batch = toy_batch()
    for mode in ("fused", "two_pass"):
        result, grads = _grads(model, objectives(STGCConfig(beta=0.2, loss=form, mode=mode), MOE), batch)
        logs = result.logs()
        for key in ("loss/total", "loss/lm", "loss/aux", "loss/aux_scaled", "loss/cel", "loss/cel_scaled"):
            assert key in logs, (mode, key)
        assert logs["loss/cel_scaled"] == pytest.approx(0.2 * logs["loss/cel"])
        assert logs["loss/aux_scaled"] == pytest.approx(0.01 * logs["loss/aux"])
        assert all(torch.isfinite(g).all() for g in grads.values())


def test_cel_applies_only_to_the_named_layers():
    model = toy_model("swiglu", num_layers=3)
    batch = toy_batch()
    _, g_base = _grads(model, objectives({"name": "baseline"}, MOE), batch)
    result, g = _grads(model, objectives(STGCConfig(beta=0.5, layers=(2,), mode="two_pass"), MOE), batch)
    # the CEL is computed and applied in layer 2 only (its gradient still flows down into layers 0-1)
    assert not torch.equal(g["layers.2.router.weight"], g_base["layers.2.router.weight"])
    cels = {layer: float(s["cel"]) for layer, s in result.observer.stats.items()}
    assert cels[0] == 0.0 and cels[1] == 0.0 and cels[2] > 0
    assert float(result.terms["cel"]) == pytest.approx(cels[2])


@pytest.mark.parametrize("ffn", ["swiglu", "gelu"])
def test_logged_total_is_the_same_objective_in_fused_and_two_pass(ffn):
    """loss/total = L_lm + alpha L_aux + beta L_cel in every mode (fused computes L_cel in the backward)."""
    model = toy_model(ffn, num_layers=1)
    batch = toy_batch(batch=4, seq=12, pad=2)
    fused = objectives(STGCConfig(beta=0.3, mode="fused"), MOE)
    f_logs = _grads(model, fused, batch, observer=fused.observer(0))[0].logs()
    t_logs = _grads(model, objectives(STGCConfig(beta=0.3, mode="two_pass"), MOE), batch)[0].logs()
    assert f_logs["loss/cel"] > 0
    for key in ("loss/total", "loss/cel", "loss/cel_scaled"):
        assert f_logs[key] == pytest.approx(t_logs[key], rel=1e-5), key
