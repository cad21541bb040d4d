"""Token gradients, conflict scores and the conflict elimination loss (stgc.conflict; docs/method.md
sections 2-5).

A toy float64 model (tests/toy_moe.py: embedding -> residual MoE blocks -> head -> CE) carries the checks
that need a full backward; the pure functions are checked on hand-made tensors.
"""

from __future__ import annotations

import pytest
import torch

from stgc.config import MoEConfig
from stgc.conflict import ConflictObserver, cel_loss, conflict_scores, reference_token_grads
from stgc.moe import MoEBlock, RoutingContext
from stgc.objectives.config import STGCConfig
from tests.toy_moe import objectives, toy_batch, toy_model

FFNS = ("swiglu", "gelu")


def _slot_of(record, token_A, expert_A):
    """The top-k slot k of each (token, expert) assignment: maps expert-sorted rows to (token, slot)."""
    match_AK = record.topk_idx_TK[token_A] == expert_A[:, None]
    assert bool((match_AK.sum(-1) == 1).all())
    return match_AK.int().argmax(-1)


@pytest.mark.parametrize("ffn", FFNS)
def test_reference_and_two_pass_token_gradients_agree(ffn):
    """The paper's per-token bias copies (torch.func) == the activation gradients of the grouped backward."""
    model = toy_model(ffn, num_layers=3)
    batch = toy_batch(pad=2)
    alpha = 0.01

    # two_pass first pass: the observer collects (g1_AF, g2_AD) of every layer inside the backward
    obs = ConflictObserver(collect_grads=True)
    ctx = RoutingContext(records=[], observer=obs)
    out = model(**batch, routing_ctx=ctx)
    main = out.loss + alpha * sum(r.aux_loss for r in ctx.records)
    from stgc.conflict import two_pass_first_pass

    two_pass_first_pass(main, ctx.records, obs)

    def loss_fn(biases):
        c = RoutingContext(records=[], injected_biases=biases)
        o = model(**batch, routing_ctx=c)
        return o.loss + alpha * sum(r.aux_loss for r in c.records)

    ref = reference_token_grads(model, loss_fn, ctx.records)
    assert set(ref) == set(obs.grads) == {0, 1, 2}
    for record in ctx.records:
        g1_AF, g2_AD, expert_A, token_A = obs.grads[record.layer_idx]
        g1_TKF, g2_TKD = ref[record.layer_idx]
        k_A = _slot_of(record, token_A, expert_A)
        torch.testing.assert_close(g2_TKD[token_A, k_A], g2_AD, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(g1_TKF[token_A, k_A], g1_AF, rtol=1e-10, atol=1e-13)
        # padding: zero in the reference (no loss reaches it); in the block its rows ride along (weight 0)
        # and carry exactly zero gradients
        pad_T = ~record.token_mask_T
        assert float(g2_TKD[pad_T].detach().abs().max()) == 0.0
        pad_A = ~record.token_mask_T[token_A]
        assert bool(pad_A.any()) and float(g1_AF[pad_A].abs().max()) == float(g2_AD[pad_A].abs().max()) == 0.0
        assert float(g2_AD.abs().max()) > 0


@pytest.mark.parametrize("ffn", FFNS)
def test_reference_and_two_pass_modes_give_the_same_masks_and_loss(ffn):
    model = toy_model(ffn, num_layers=2)
    batch = toy_batch(batch=4, seq=10, pad=1)
    moe = MoEConfig()
    results = {}
    for mode in ("reference", "two_pass"):
        model.zero_grad()
        method = objectives(STGCConfig(beta=0.1, mode=mode), moe)
        step = method.step_loss(model, batch, step=0)
        step.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[mode] = (step, grads)
    (ref, ref_grads), (tp, tp_grads) = results["reference"], results["two_pass"]
    for layer in (0, 1):
        a, b = ref.observer.layers[layer], tp.observer.layers[layer]
        assert torch.equal(a.token_A, b.token_A) and torch.equal(a.expert_A, b.expert_A)
        torch.testing.assert_close(a.score_A, b.score_A, rtol=1e-9, atol=1e-12)
        assert torch.equal(a.conflict_A, b.conflict_A)
        assert int(a.conflict_A.sum()) > 0  # the check is not vacuous
    torch.testing.assert_close(ref.terms["cel"], tp.terms["cel"], rtol=1e-12, atol=1e-14)
    for name in tp_grads:
        torch.testing.assert_close(ref_grads[name], tp_grads[name], rtol=1e-9, atol=1e-12)


def test_zero_norm_gradients_never_conflict():
    """Rows with zero gradient (no loss reaches them) and experts whose mean is zero are not considered."""
    g = torch.tensor(
        [[1.0, 0.0], [0.0, 0.0], [1.0, 0.2], [-1.0, 0.0], [0.5, 0.5], [1.0, 1.0]], dtype=torch.float64
    )
    expert = torch.tensor([0, 0, 0, 0, 1, 1])
    valid = torch.ones(6, dtype=torch.bool)
    score, considered = conflict_scores(g, 2 * g, expert, valid, num_experts=3)
    assert considered.tolist() == [True, False, True, True, True, True]
    assert score.dtype == torch.float64
    # expert 0's mean points along +x: row 3 (-x) conflicts at tau = 0, the zero row 1 does not
    assert float(score[3]) < 0 and float(score[0]) > 0
    conflict = considered & (score < 0.0)
    assert conflict.tolist() == [False, False, False, True, False, False]
    # an expert whose tokens cancel exactly has a zero mean: nothing in it is considered
    g_cancel = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    score, considered = conflict_scores(
        g_cancel, g_cancel, torch.tensor([0, 0]), torch.ones(2, dtype=bool), 2
    )
    assert not bool(considered.any())


def test_tokens_without_loss_are_never_conflicting_in_a_model():
    """Tokens whose next-token label is ignored get zero gradients in the toy model (no attention): never
    considered, never conflicting. (alpha = 0: with the load-balancing loss, a token's output in one layer
    reaches the next layer's router and L_aux, so its gradient there is small but not zero.)"""
    model = toy_model("swiglu", num_layers=2)
    batch = toy_batch(batch=3, seq=8)
    batch["labels"][:, 1:5] = -100  # positions 0..3 predict ignored labels
    method = objectives(STGCConfig(beta=0.5, mode="two_pass"), MoEConfig(aux_loss_coef=0.0))
    step = method.step_loss(model, batch, 0)
    for layer in step.observer.layers.values():
        pos_A = layer.token_A % 8
        no_loss = (pos_A <= 3) | (pos_A == 7)  # the last position predicts nothing
        assert not bool(layer.considered_A[no_loss].any())
        assert not bool(layer.conflict_A[no_loss].any())
        assert bool(layer.considered_A[~no_loss].all())


def test_empty_experts_are_handled():
    # pure function: expert 1 of 3 has no rows
    g = torch.randn(4, 3, dtype=torch.float64)
    score, considered = conflict_scores(g, g, torch.tensor([0, 0, 2, 2]), torch.ones(4, dtype=bool), 3)
    assert score.shape == (4,) and torch.isfinite(score).all() and bool(considered.all())
    # in a block: 2 tokens, top-1 of 4 experts -> at least 2 experts receive nothing
    torch.manual_seed(0)
    block = MoEBlock(MoEConfig(num_experts=4, top_k=1), 6, 5, "swiglu", layer_idx=0).double()
    obs = ConflictObserver(scale=0.3)
    x = torch.randn(1, 2, 6, dtype=torch.float64, requires_grad=True)
    block.routing_ctx = RoutingContext(records=[], observer=obs)
    y = block(x)
    y.square().sum().backward()
    layer = obs.layers[0]
    assert int(torch.bincount(layer.expert_A, minlength=4).eq(0).sum()) >= 2
    stats = obs.stats[0]
    assert torch.isfinite(stats["fraction"]) and torch.isfinite(stats["mean_cos"])
    assert torch.isfinite(block.router.weight.grad).all() and torch.isfinite(x.grad).all()
    # one token per expert: each equals its mean (cos 1): nothing conflicts, the CEL is exactly 0
    assert not bool(layer.conflict_A.any()) and float(layer.cel.detach()) == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tau=1.5), "tau"),
        (dict(tau=-1.01), "tau"),
        (dict(beta=-0.1), "beta"),
        (dict(score="cosine"), "score"),
        (dict(loss="hinge"), "loss"),
        (dict(mode="fast"), "mode"),
        (dict(start_step=-1), "start_step"),
    ],
)
def test_stgc_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        STGCConfig(**kwargs)


def test_observer_and_loss_validation():
    with pytest.raises(ValueError, match="score"):
        ConflictObserver(score="x")
    with pytest.raises(ValueError, match="loss form"):
        ConflictObserver(loss_form="x")
    with pytest.raises(ValueError, match="loss form"):
        cel_loss(torch.zeros(2, 4), torch.tensor([0]), torch.tensor([1]), torch.tensor([True]), "x")
    with pytest.raises(ValueError, match="score"):
        conflict_scores(
            torch.ones(1, 2), torch.ones(1, 2), torch.tensor([0]), torch.tensor([True]), 2, score="x"
        )


@pytest.mark.parametrize("form", ["neg_logit_ce", "prob", "min_score"])
def test_loss_forms_lower_the_conflicting_experts_logit(form):
    """Every form's gradient is positive on the conflicting expert's logit (a descent step lowers it), zero on
    tokens that do not conflict; neg_logit_ce moves the mass to the other experts."""
    torch.manual_seed(0)
    z_TE = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    token_A = torch.tensor([0, 1, 2, 3])
    expert_A = torch.tensor([1, 1, 2, 0])
    conflict_A = torch.tensor([True, False, True, False])
    loss = cel_loss(z_TE, token_A, expert_A, conflict_A, form)
    (g_TE,) = torch.autograd.grad(loss, z_TE)
    for t, e in ((0, 1), (2, 2)):
        assert g_TE[t, e] > 0
        if form == "neg_logit_ce":
            others = [j for j in range(4) if j != e]
            assert bool((g_TE[t, others] < 0).all())
            # (onehot_e - softmax(-z_t)) / |C|
            expected = (torch.nn.functional.one_hot(torch.tensor(e), 4) - torch.softmax(-z_TE[t], -1)) / 2
            torch.testing.assert_close(g_TE[t], expected.detach())
    for t in (1, 3, 4):
        assert float(g_TE[t].abs().max()) == 0.0
    # a step against the gradient lowers the conflicting expert's routing probability
    z2 = z_TE.detach() - 0.5 * g_TE
    for t, e in ((0, 1), (2, 2)):
        assert torch.softmax(z2[t], -1)[e] < torch.softmax(z_TE.detach()[t], -1)[e]


def test_cel_without_conflicts_is_zero_not_nan():
    z = torch.randn(3, 4, requires_grad=True)
    loss = cel_loss(
        z, torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([False, False]), "neg_logit_ce"
    )
    (g,) = torch.autograd.grad(loss, z)
    assert float(loss.detach()) == 0.0 and float(g.abs().max()) == 0.0
