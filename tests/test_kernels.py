"""The Triton kernels of the fused MoE path (``stgc.moe.fused``: routing in two launches, the expert path's
elementwise passes, the fused observer's token-wise scores and CEL gradient) equals the eager path.

On a GPU these run the compiled kernels; without one, Triton's interpreter runs them on CPU tensors
(``TRITON_INTERPRET=1`` from conftest, ``stgc.moe.fused.passes.TRITON_ON_CPU``), so CI checks the
kernels' logic too.
"""

from __future__ import annotations

import pytest
import torch

import stgc.moe.dispatch
import stgc.moe.fused
import stgc.moe.fused.passes
from stgc.config import MoEConfig
from stgc.conflict import ConflictObserver
from stgc.moe import MoEBlock, RoutingContext, routing_context

pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
D, F_ = 32, 48


def _use_triton(monkeypatch, triton: bool) -> None:
    monkeypatch.setattr(stgc.moe.fused.passes, "TRITON_ON_CPU", triton and DEV == "cpu")
    if triton:
        monkeypatch.delenv("STGC_NO_TRITON", raising=False)
    else:
        monkeypatch.setenv("STGC_NO_TRITON", "1")


def _block_step(triton: bool, monkeypatch, cfg, ffn, mask, observer, dtype=torch.float32, products="auto"):
    _use_triton(monkeypatch, triton)
    torch.manual_seed(0)
    block = MoEBlock(cfg, D, F_, ffn, layer_idx=0).to(DEV, dtype).train()
    block.router.float()
    block.expert_products = products
    if ffn == "gelu":
        with torch.no_grad():
            block.experts.b_in.normal_()
            block.experts.b_out.normal_()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 37, D, generator=g).to(DEV, dtype).requires_grad_()
    dy = torch.randn(3, 37, D, generator=g).to(DEV, dtype)
    ctx = RoutingContext(token_mask_BT=mask, records=[], observer=observer)
    with routing_context(block, ctx):
        y = block(x)
    r = ctx.records[0]
    # every differentiable routing output gets a gradient: weights (through y), aux, probs and logits
    loss = (y.float() * dy.float()).sum() + 0.3 * r.aux_loss
    loss = loss + 0.1 * r.probs_TE[:, 0].square().sum() + 0.05 * r.logits_TE.square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in block.named_parameters()}
    return y.detach(), x.grad, grads, r, observer.layers.get(0) if observer is not None else None


def _mask():
    mask = torch.ones(3, 37, dtype=torch.bool)
    mask[0, 30:] = mask[2, 5:] = False
    return mask.to(DEV)


CASES = [
    # ffn, mask, K, E, score, loss form, route_padding, CEL scale, capacity factor
    ("swiglu", True, 2, 4, "mean", "neg_logit_ce", False, 0.1, None),
    ("swiglu", False, 1, 5, "concat", "neg_logit_ce", False, 0.5, None),
    ("swiglu", True, 3, 5, "g1", "neg_logit_ce", True, 0.1, None),
    ("swiglu", True, 2, 4, "g2", "prob", False, 0.1, None),
    ("swiglu", True, 2, 4, "mean", "neg_logit_ce", False, 0.0, None),  # measure only (two_pass's 1st pass)
    ("gelu", True, 2, 4, "mean", "neg_logit_ce", False, 0.1, None),
    ("swiglu", False, 3, 17, "mean", "neg_logit_ce", False, 0.1, None),  # more experts than a 16-wide tile
    ("swiglu", True, 2, 4, "mean", "neg_logit_ce", False, 0.1, 1.0),  # eager routing (capacity), Triton rest
]


@pytest.mark.parametrize("ffn,masked,K,E,score,form,route_padding,scale,capacity", CASES)
def test_triton_block_equals_eager(
    monkeypatch, ffn, masked, K, E, score, form, route_padding, scale, capacity
):
    """Outputs, every gradient (input, router, experts; with the fused CEL gradient), the routing record and
    the observer's scores and masks agree between the two paths, with padding and without; the Triton
    path is deterministic (no atomics: two runs are bit-identical)."""
    cfg = MoEConfig(
        num_experts=E, top_k=K, route_padding=route_padding, capacity_factor=capacity, min_capacity=0
    )
    mask = _mask() if masked else None

    def run(triton):
        obs = ConflictObserver(score=score, loss_form=form, scale=scale)
        return _block_step(triton, monkeypatch, cfg, ffn, mask, obs)

    eager, fast, again = run(False), run(True), run(True)
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast[0], eager[0], **tol)
    torch.testing.assert_close(fast[1], eager[1], **tol)
    assert fast[2].keys() == eager[2].keys()
    for name in eager[2]:
        torch.testing.assert_close(fast[2][name], eager[2][name], **tol, msg=name)
    re, rf = eager[3], fast[3]
    for field in ("logits_TE", "probs_TE", "weights_TK", "aux_loss"):
        torch.testing.assert_close(getattr(rf, field), getattr(re, field), **tol, msg=field)
    for field in ("topk_idx_TK", "token_mask_T", "kept_TK", "tokens_per_expert_E"):
        assert torch.equal(getattr(rf, field), getattr(re, field)), field
    le, lf = eager[4], fast[4]
    assert torch.equal(lf.token_A, le.token_A) and torch.equal(lf.expert_A, le.expert_A)
    assert torch.equal(lf.considered_A, le.considered_A)
    assert torch.equal(lf.conflict_A, le.conflict_A)
    assert bool(lf.conflict_A.any()) and bool(lf.considered_A.any()), "a case that tests nothing"
    torch.testing.assert_close(lf.score_A, le.score_A, **tol)
    torch.testing.assert_close(lf.cel, le.cel, **tol)
    if capacity is not None:  # the case must drop real assignments, or it tests nothing
        assert bool((~rf.kept_TK & rf.token_mask_T[:, None]).any())
    if masked:  # padding is never considered, and gets nothing from the experts
        assert not bool((lf.considered_A & ~mask.reshape(-1)[lf.token_A]).any())
        if not route_padding:
            assert float(fast[0][~mask].abs().max()) == 0.0
    for a, b in zip((fast[0], fast[1], *fast[2].values()), (again[0], again[1], *again[2].values())):
        assert torch.equal(a, b)
    assert torch.equal(fast[4].score_A, again[4].score_A)


@pytest.mark.parametrize("ffn", ["swiglu", "gelu"])
@pytest.mark.parametrize("products", ["grouped", "grouped_forward"])
def test_triton_routing_issues_the_first_grouped_product(monkeypatch, ffn, products):
    """With grouped expert products the routing issues the first one itself, right after its kernels
    (``route_and_dispatch``'s ``issue_first_product``), and the expert path uses it: of the forward's two
    grouped products the expert path issues only the second; outputs and gradients stay the eager path's."""
    products_issued, by_expert_path = [], []
    grouped, rows_wt = stgc.moe.dispatch.grouped_rows_wt, stgc.moe.dispatch.ExpertGroups.rows_wt

    def counted(*args):
        products_issued.append(1)
        return grouped(*args)

    def counted_rows_wt(self, *args):
        by_expert_path.append(1)
        return rows_wt(self, *args)

    monkeypatch.setattr(stgc.moe.dispatch, "grouped_rows_wt", counted)
    monkeypatch.setattr(stgc.moe.fused, "grouped_rows_wt", counted)
    monkeypatch.setattr(stgc.moe.dispatch.ExpertGroups, "rows_wt", counted_rows_wt)
    cfg = MoEConfig(num_experts=4, top_k=2)

    def run(triton):
        products_issued.clear(), by_expert_path.clear()
        obs = ConflictObserver(scale=0.1)
        return _block_step(triton, monkeypatch, cfg, ffn, _mask(), obs, products=products)

    eager = run(False)
    assert len(products_issued) == len(by_expert_path) == 2
    fast = run(True)
    assert len(products_issued) == 2, "the forward's grouped products are two"
    assert len(by_expert_path) == 1, "the routing did not issue the first product, or it was not used"
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast[0], eager[0], **tol)
    torch.testing.assert_close(fast[1], eager[1], **tol)
    for name in eager[2]:
        torch.testing.assert_close(fast[2][name], eager[2][name], **tol, msg=name)


def test_triton_kernels_with_several_column_blocks(monkeypatch):
    """The column-blocked kernels (routing backward, combine, row dot, gather) with blocks narrower than
    D (here D = 32: two blocks of 16 each), as at the bench shape, equal the eager path."""
    import stgc.moe.fused.launch as K

    for name in ("ROUTE_BWD_BLOCK_D", "COMBINE_BLOCK_D", "ROWDOT_BLOCK_D", "GATHER_BLOCK_D", "ROUTE_BLOCK_D"):
        monkeypatch.setattr(K, name, 16)
    cfg = MoEConfig(num_experts=4, top_k=2)

    def run(triton):
        return _block_step(triton, monkeypatch, cfg, "swiglu", _mask(), None)

    eager, fast = run(False), run(True)
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast[0], eager[0], **tol)
    torch.testing.assert_close(fast[1], eager[1], **tol)
    for name in eager[2]:
        torch.testing.assert_close(fast[2][name], eager[2][name], **tol, msg=name)


@pytest.mark.parametrize("products", ["auto", "grouped"])
@pytest.mark.parametrize("mode", ["fused", "two_pass"])
def test_triton_stgc_modes_equal_eager(monkeypatch, mode, products):
    """STGC's training loss and every parameter gradient on a two-layer stack agree between the paths
    (per-expert and grouped expert products)."""
    from stgc.bench.stgc import MoEStack, StackShape, _method

    def run(triton):
        _use_triton(monkeypatch, triton)
        shape = StackShape(hidden_size=D, ffn_size=F_, num_layers=2, tokens=96)
        torch.manual_seed(0)
        model = MoEStack(shape).to(DEV)
        for b in model.blocks:
            b.expert_products = products
        x = torch.randn(shape.tokens, D, device=DEV)
        method = _method(mode, model.blocks[0].config)
        out = method.step_loss(model, {"x": x, "target": torch.randn_like(x)}, 1)
        out.loss.backward()
        return out.logs(), {n: p.grad for n, p in model.named_parameters()}

    (log_e, grad_e), (log_f, grad_f) = run(False), run(True)
    assert log_e.keys() == log_f.keys()
    for k in log_e:
        assert log_f[k] == pytest.approx(log_e[k], rel=1e-4, abs=1e-6), k
    for name in grad_e:
        torch.testing.assert_close(grad_f[name], grad_e[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("products", ["auto", "grouped"])
def test_triton_routing_at_evaluation(monkeypatch, products):
    """Evaluation routing on the Triton path under no_grad: deterministic, no records kept by the block,
    same routing as eager."""
    cfg = MoEConfig()

    def run(triton):
        _use_triton(monkeypatch, triton)
        torch.manual_seed(0)
        block = MoEBlock(cfg, D, F_, "swiglu", 0).to(DEV).eval()
        block.expert_products = products
        x = torch.randn(2, 9, D, device=DEV)
        ctx = RoutingContext(records=[])
        with torch.no_grad(), routing_context(block, ctx):
            y = block(x)
        assert block.routing_ctx is None
        return y, ctx.records[0]

    (ye, re), (yf, rf), (yf2, _) = run(False), run(True), run(True)
    assert torch.equal(yf, yf2)
    torch.testing.assert_close(yf, ye, rtol=1e-4, atol=1e-5)
    assert torch.equal(rf.topk_idx_TK, re.topk_idx_TK)


def _train_block(monkeypatch, triton: bool, E: int = 4):
    _use_triton(monkeypatch, triton)
    torch.manual_seed(0)
    block = MoEBlock(MoEConfig(num_experts=E), D, F_, "swiglu", 0).to(DEV).train()
    return block


def test_triton_path_odd_inputs(monkeypatch):
    """A non-contiguous input (the router's input gradient is written row-major), exact ties (the lower
    expert index first, on both paths), a NaN row (no expert index past E), no tokens at all, and an
    in-place edit of tokens_per_expert before the backward (e.g. an all-reduce for logging)."""
    from stgc.moe.fused.routing_kernels import route_and_dispatch

    def run(triton, x):
        block = _train_block(monkeypatch, triton)
        xi = x.clone().requires_grad_() if x.is_contiguous() else x.detach().requires_grad_()
        ctx = RoutingContext(records=[])
        with routing_context(block, ctx):
            y = block(xi.view(3, 37, D) if not x.is_contiguous() else xi)
        ctx.records[0].tokens_per_expert_E.add_(0)
        (y.square().sum() + ctx.records[0].aux_loss).backward()
        return y.detach(), xi.grad, block.router.weight.grad, ctx.records[0].topk_idx_TK

    x = torch.randn(D, 111, device=DEV).t()  # (111, D), stride (1, 111): dense but not row-major
    x[:5] = 0.0  # zero rows: uniform probabilities, every expert tied
    assert not x.is_contiguous()
    e, f = run(False, x), run(True, x)
    for a, b in zip(f, e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.equal(f[3][:5], torch.tensor([[0, 1]] * 5, device=DEV))

    _use_triton(monkeypatch, True)
    w = torch.randn(5, D, device=DEV)
    xn = torch.randn(7, D, device=DEV)
    xn[3] = float("nan")
    r = route_and_dispatch(xn, w, None, 2, False, gather=True)
    assert int(r.topk_TK.max()) < 5 and int(r.offsets_E[-1]) == 14
    r0 = route_and_dispatch(xn[:0], w, None, 2, False, gather=True)
    assert r0.topk_TK.shape == (0, 2) and float(r0.aux) == 0.0 and int(r0.offsets_E.sum()) == 0


@pytest.mark.parametrize("products", ["auto", "grouped"])
def test_triton_path_keeps_no_activations_under_checkpointing(monkeypatch, products):
    """With activation checkpointing nothing the size of the gathered inputs (T*K x D) or of the first
    product (T*K x 2F) stays alive between the forward and the backward: the backward's tensors all go
    through save_for_backward."""
    import gc

    from torch.utils.checkpoint import checkpoint

    block = _train_block(monkeypatch, True)
    block.expert_products = products
    x = torch.randn(64, D, device=DEV, requires_grad=True)
    with routing_context(block, RoutingContext()):
        y = checkpoint(block, x, use_reentrant=False)
    gc.collect()
    sizes = {(128, D), (128, 2 * F_)}
    big = [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and tuple(t.shape) in sizes]
    assert not big, f"{len(big)} tensors of the expert path's size alive"
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_block_bf16_on_gpu(monkeypatch):
    """bf16 at a shape where the grouped GEMMs run: the Triton path against the eager one (bf16 rounding
    differs in g2: the fused observer's scores are taken from dy in fp32), masks agree on nearly all pairs."""
    cfg = MoEConfig()

    def run(triton):
        monkeypatch.setenv("STGC_NO_TRITON", "0" if triton else "1")
        monkeypatch.setenv("STGC_NO_COMPILE", "1")
        torch.manual_seed(0)
        block = MoEBlock(cfg, 256, 512, "swiglu", 0).cuda().bfloat16().train()
        block.router.float()
        g = torch.Generator(device="cuda").manual_seed(1)
        x = torch.randn(4, 256, 256, device="cuda", generator=g).bfloat16().requires_grad_()
        obs = ConflictObserver(scale=0.01)
        ctx = RoutingContext(records=[], observer=obs)
        with routing_context(block, ctx):
            y = block(x)
        (y.float().square().mean() + 0.01 * ctx.records[0].aux_loss).backward()
        return y, x.grad, block.router.weight.grad, block.experts.w_in.grad, obs.layers[0]

    e, f = run(False), run(True)
    for a, b in zip(f[:4], e[:4]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)
    agree = (f[4].conflict_A == e[4].conflict_A).float().mean().item()
    assert agree > 0.99, agree
