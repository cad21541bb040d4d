"""The fused fast path of a MoE layer (docs/architecture.md, "The MoE layer"): the routing as two Triton
launches that also issue the first expert product, grouped expert products with a hand-written backward,
the expert path's elementwise passes as Triton kernels, and STGC's observer scored from one read of dy.

It is registered for the (router, bank) pairs it supports (``FUSED_PAIRS``) and chosen once, when a block
is built (``stgc.moe.block.MoEBlock``); the eager parts (``stgc.moe.routers``, ``stgc.moe.experts``) are
the specification it is tested against (``tests/test_fast_paths.py``). Inside, what runs depends on the
tensors: the Triton kernels on CUDA (or on CPU under Triton's interpreter in tests), plain torch passes
elsewhere; the fused routing only for the default deterministic top-k (no bias, capacity or sampling),
the eager router plus the eager expert sort otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from stgc.moe.dispatch import (
    DispatchPlan,
    ExpertGroups,
    grouped_rows_wt,
    sort_assignments,
    use_grouped_mm,
    valid_assignments,
)
from stgc.moe.experts.ffn import FFNExperts
from stgc.moe.fused.experts_fn import ExpertsFn
from stgc.moe.fused.passes import triton_ok
from stgc.moe.record import RoutingContext, RoutingRecord
from stgc.moe.routers.softmax_topk import SoftmaxTopKRouter

if TYPE_CHECKING:
    from stgc.moe.block import MoEBlock

# (router class, bank class) pairs the fused path runs; a peer router whose records the eager dispatch can
# sort registers itself here with ``register_fused`` to get the fused bank.
FUSED_PAIRS: set[tuple[type, type]] = {(SoftmaxTopKRouter, FFNExperts)}


def register_fused(router_cls: type, bank_cls: type) -> None:
    FUSED_PAIRS.add((router_cls, bank_cls))


def supports(router, experts) -> bool:
    return (type(router), type(experts)) in FUSED_PAIRS


def fused_forward(block: MoEBlock, x_TD: Tensor, token_mask_T: Tensor | None, ctx: RoutingContext | None):
    """(record, y_TD) of one MoE layer on the fused path."""
    triton = block.use_triton and triton_ok(x_TD)
    observer = ctx.observer if ctx is not None else None
    if triton and _fused_routing(block):
        record, plan = _route_triton(block, x_TD, token_mask_T, ctx)
    else:
        if token_mask_T is None:
            token_mask_T = torch.ones(x_TD.shape[0], dtype=torch.bool, device=x_TD.device)
        record = block.router(x_TD, token_mask_T, ctx)
        plan = _sort_plan(block, x_TD, record, ctx, triton)
    b = block.experts
    y_TD = ExpertsFn.apply(
        x_TD, record.weights_TK, record.logits_TE, b.w_in, b.b_in, b.w_out, b.b_out, plan, b.ffn, observer,
        record,
    )  # fmt: skip
    return record, y_TD


def _fused_routing(block: MoEBlock) -> bool:
    """Whether the routing runs as the two Triton launches (``_RouteFn``): the default deterministic top-k
    router (no bias, no capacity, no Gumbel sampling in this mode)."""
    c, router = block.config, block.router
    if type(router) is not SoftmaxTopKRouter or router.bias is not None:
        return False
    sampling = c.second_expert_sampling and (block.training or c.sample_at_eval)
    return c.capacity(block.training) is None and not sampling


def _grouped(block: MoEBlock, x_TD: Tensor) -> bool:
    """Whether the expert products are grouped with device offsets (``use_grouped_mm``)."""
    b = block.experts
    return use_grouped_mm(x_TD, (b.hidden_size, b.w_in.shape[1], b.intermediate_size), block.expert_products)


def _route_triton(
    block: MoEBlock, x_TD: Tensor, token_mask_T: Tensor | None, ctx: RoutingContext | None
) -> tuple[RoutingRecord, DispatchPlan]:
    c = block.config
    T, K = x_TD.shape[0], c.top_k
    grouped = _grouped(block, x_TD)
    w_in = (block.experts.w_in if grouped else None,)  # (a tuple: autograd does not track it)
    logits, probs, weights, aux, r = _RouteFn.apply(
        x_TD, block.router.weight, token_mask_T, K, c.route_padding, w_in
    )
    token_mask_T = r.token_mask_T if token_mask_T is None else token_mask_T
    if c.route_padding:
        kept = r.token_mask_T.new_ones(1, 1).expand(T, K)
    else:
        kept = token_mask_T[:, None].expand(T, K)
    record = RoutingRecord(
        layer_idx=block.layer_idx,
        logits_TE=logits,
        probs_TE=probs,
        topk_idx_TK=r.topk_TK,
        weights_TK=weights,
        token_mask_T=token_mask_T,
        kept_TK=kept,
        tokens_per_expert_E=r.tokens_per_expert_E,
        aux_loss=aux,
    )
    groups = ExpertGroups.for_rows(T * K, r.offsets_E, c.num_experts, block.expert_products, grouped)
    observed = ctx is not None and ctx.observer is not None
    masked = ctx is not None and ctx.token_mask_BT is not None
    return record, DispatchPlan(
        token_A=r.token_A,
        expert_A=r.expert_A,
        order_A=r.order_A,
        pos_TK=r.pos_TK,
        groups=groups,
        triton_passes=True,
        valid_TK=valid_assignments(record, observed, masked, dropping=False),
        inputs_AD=r.x_AD,
        weights_A=r.w_A,
        first_product_AH=r.first_product,
    )


def _sort_plan(
    block: MoEBlock, x_TD: Tensor, record: RoutingRecord, ctx: RoutingContext | None, triton: bool
) -> DispatchPlan:
    """The eager expert sort of a record's assignments (CPU, fp64, a peer router, capacity or sampling).
    Null-expert rows (columns >= E) sort last and are not computed."""
    E, R = block.config.num_experts, record.num_experts
    expert_A, order_A, token_A, pos_TK = sort_assignments(record.topk_idx_TK)
    flat = record.topk_idx_TK.reshape(-1)
    counts = torch.zeros(R, dtype=torch.long, device=x_TD.device).index_add_(0, flat, torch.ones_like(flat))
    # (not bincount: it syncs to size its output)
    offsets = counts[:E].cumsum(0)
    rows = flat.numel()
    groups = ExpertGroups.for_rows(rows, offsets, E, block.expert_products, _grouped(block, x_TD))
    observed = ctx is not None and ctx.observer is not None
    masked = ctx is not None and ctx.token_mask_BT is not None
    dropping = block.config.capacity(block.training) is not None or R > E
    return DispatchPlan(
        token_A=token_A,
        expert_A=expert_A,
        order_A=order_A,
        pos_TK=pos_TK,
        groups=groups,
        triton_passes=triton,
        valid_TK=valid_assignments(record, observed, masked, dropping),
        skips_rows=R > E,
    )


class _RouteFn(torch.autograd.Function):
    """The Triton routing (``routing_kernels.route_and_dispatch``) as an autograd function: the router
    logits, probabilities, combine weights and aux loss are differentiable (their gradients in closed form,
    ``routing_kernels.route_backward``); indices, counts, the dispatch and the token mask are not. ``w_in``
    (the bank's input projections, or ``None``) passes in a tuple, untracked: the routing then issues the
    first expert product itself (``Routed.first_product``, ``DispatchPlan.first_product_AH``), as early as
    the host can, whose gradients ``ExpertsFn`` computes."""

    @staticmethod
    def forward(ctx, x_TD, w_ED, token_mask_T, top_k, count_padding, w_in=(None,)):
        from stgc.moe.fused.routing_kernels import route_and_dispatch

        (w_in_EHD,) = w_in
        issue = None
        if w_in_EHD is not None:

            def issue(x_AD: Tensor, offsets_E: Tensor) -> Tensor:
                return grouped_rows_wt(x_AD, w_in_EHD, offsets_E)

        r = route_and_dispatch(
            x_TD, w_ED, token_mask_T, top_k, count_padding, gather=True, issue_first_product=issue
        )
        ctx.save_for_backward(x_TD, w_ED, token_mask_T, r.probs_TE, r.topk_TK, r.weights_TK, r.f_E, r.n_real)
        ctx.count_padding = count_padding
        ctx.set_materialize_grads(False)
        # the rest of ``r`` (indices, counts, the dispatch) passes through untracked (fewer outputs to wrap)
        return r.logits_TE, r.probs_TE, r.weights_TK, r.aux, r

    @staticmethod
    def backward(ctx, g_logits, g_probs, g_weights, g_aux, *_):
        from stgc.moe.fused.routing_kernels import route_backward

        x_TD, w_ED, token_mask_T, probs, topk, weights, f_E, n_real = ctx.saved_tensors
        if all(g is None for g in (g_logits, g_probs, g_weights, g_aux)):
            return (None,) * 6
        dx, dw = route_backward(
            x_TD, w_ED, token_mask_T, ctx.count_padding, probs, topk, weights, f_E, n_real,
            g_logits, g_probs, g_weights, g_aux,
        )  # fmt: skip
        return dx, dw.to(w_ED.dtype), None, None, None, None
