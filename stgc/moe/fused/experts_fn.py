"""The fused expert path: sorted-token expert products with a hand-written backward that has the token
gradients in hand (shape legend in ``stgc.moe.record``). It computes what ``stgc.moe.experts.ffn``'s eager
bank computes; ``tests/test_fast_paths.py`` holds the two equal."""

from __future__ import annotations

import torch
from torch import Tensor

from stgc.moe.dispatch import expert_sums
from stgc.moe.experts.ffn import act_forward
from stgc.moe.fused.passes import act_backward, combine, maybe_compiled, rowdot_scale
from stgc.moe.record import TokenGrads


def _zero_null_rows(t_AX: Tensor, expert_A: Tensor, num_experts: int) -> Tensor:
    """Rows of null experts (column >= E) zeroed: the products never computed them."""
    return t_AX.masked_fill_((expert_A >= num_experts)[:, None], 0)


class ExpertsFn(torch.autograd.Function):
    """Sorted-token expert computation and combine, with a hand-written backward.

    Forward: x_A = x[token_A]; h = x_A W_in[e]^T (+b_in) (gate and up in ONE product for SwiGLU);
    a = act(h); o = a W_out[e]^T (+b_out); y[t] = sum over its K assignments of w_A * o_A. Every (token,
    slot) assignment is a row (dropped, padding and null ones with w_A = 0), so the row count T*K is known
    on the host and the products need no device sync (``stgc.moe.dispatch.ExpertGroups``); null rows sort
    past the bank's experts and are never computed (``DispatchPlan.skips_rows``: zeroed instead).
    Backward has the token-level bias gradients in hand (g2_A = w_A dy[token_A], g1_A = dL/da (SwiGLU's
    virtual bias) or dL/dh (GELU's fc1 bias)), so a gradient observer (STGC fused mode) can add a
    router-logit gradient in the same pass. ``logits_TE`` is an input only so that the observer's extra
    gradient has somewhere to go. With ``DispatchPlan.triton_passes`` each elementwise pass is one kernel
    and, for SwiGLU, the observer also gets the per-expert sums of g2 from the pass that writes g2.
    """

    @staticmethod
    def forward(ctx, x_TD, weights_TK, logits_TE, w_in, b_in, w_out, b_out, plan, ffn, observer, record):
        F_, E = w_out.shape[-1], w_in.shape[0]
        d, groups = plan, plan.groups
        x_AD = x_TD.index_select(0, d.token_A) if d.inputs_AD is None else d.inputs_AD
        w_A = weights_TK.reshape(-1).index_select(0, d.order_A) if d.weights_A is None else d.weights_A
        triton_passes = d.triton_passes
        if triton_passes:
            from stgc.moe.fused import expert_kernels as kernels
        # (the routing's first product is taken over: the bias below is added to it in place)
        h_AH = groups.rows_wt(x_AD, w_in) if d.first_product_AH is None else d.first_product_AH
        d.first_product_AH = None
        groups.send_sizes()  # (after the first product: nothing before it delays the GPU's start)
        expert_A = d.expert_A.clamp_max(E - 1) if d.skips_rows else d.expert_A
        if d.skips_rows:
            _zero_null_rows(h_AH, d.expert_A, E)
        if b_in is not None:
            h_AH += b_in.index_select(0, expert_A)
            if d.skips_rows:
                _zero_null_rows(h_AH, d.expert_A, E)
        if triton_passes and ffn == "swiglu":
            a_AF = kernels.swiglu_forward(h_AH)
        else:
            a_AF = maybe_compiled(f"act_{ffn}", act_forward, h_AH)(ffn, h_AH, F_)
        o_AD = groups.rows_wt(a_AF, w_out)
        if b_out is not None:
            o_AD += b_out.index_select(0, expert_A)
        if d.skips_rows:
            _zero_null_rows(o_AD, d.expert_A, E)
        if triton_passes:
            y_TD = kernels.combine(o_AD, d.pos_TK, weights_TK)
        else:
            y_TD = maybe_compiled("combine", combine, o_AD)(o_AD, d.pos_TK, weights_TK)
        # every tensor the backward reads goes through save_for_backward (activation checkpointing and
        # offloading manage only those): the plan is kept without its tensors
        ctx.save_for_backward(
            x_AD, h_AH, a_AF, o_AD, w_A, w_in, w_out, d.token_A, d.expert_A, d.order_A, d.pos_TK, d.valid_TK
        )
        ctx.groups, ctx.ffn, ctx.observer, ctx.record = groups, ffn, observer, record
        ctx.has_bias, ctx.triton_passes, ctx.skips_rows = b_in is not None, triton_passes, d.skips_rows
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        kept = getattr(ctx, "kept_grads", None)
        if kept is not None:  # two_pass: computed by the first pass from the same upstream gradient
            ctx.kept_grads = None
            return kept
        x_AD, h_AH, a_AF, o_AD, w_A, w_in, w_out, token_A, expert_A, order_A, pos_TK, valid_TK = (
            ctx.saved_tensors
        )
        ffn, groups, observer, triton_path = ctx.ffn, ctx.groups, ctx.observer, ctx.triton_passes
        if triton_path:
            from stgc.moe.fused import expert_kernels as kernels
        F_ = w_out.shape[-1]
        E = w_in.shape[0]
        need_x, need_w, _, need_win, need_bin, need_wout, need_bout = ctx.needs_input_grad[:7]
        layer = ctx.record.layer_idx
        plan = getattr(observer, "first_pass", None)  # two_pass's first backward (``FirstPass``)
        keep = plan is not None and layer == plan.keep_layer
        if plan is not None and not keep:
            need_win = need_bin = need_wout = need_bout = False
            need_x = need_x and layer != plan.stop_layer
        observe = observer is not None and getattr(observer, "active", True)
        # SwiGLU on the Triton path: the observer scores from dy and the sums of g2 (``TokenGrads``), when
        # the router's columns are the bank's experts (no null experts)
        fast_obs = observe and triton_path and ffn == "swiglu" and ctx.record.num_experts == E
        dy_TD = dy_TD.contiguous()
        # dL/dw_A = <dy_t, o_A>; g2_A = w_A * dy_t is the output-bias gradient of assignment A
        sums2_ED = None
        if triton_path:
            stats = dict(expert_A=expert_A, num_experts=E, order_A=order_A, valid_TK=valid_TK)
            grad_w_A, g2_AD, sums2_ED = kernels.rowdot_scale(
                dy_TD, token_A, o_AD, w_A, **(stats if fast_obs else {})
            )
        else:
            grad_w_A, g2_AD = maybe_compiled("rowdot", rowdot_scale, o_AD)(dy_TD, token_A, o_AD, w_A)
        grad_w_TK = None
        if need_w:
            grad_w_TK = torch.empty_like(grad_w_A).index_copy_(0, order_A, grad_w_A).view(pos_TK.shape)
        grad_a_AF = groups.rows_w(g2_AD, w_out)  # = the virtual first-bias gradient (SwiGLU)
        if ctx.skips_rows:
            _zero_null_rows(grad_a_AF, expert_A, E)
        with_sq = observe and ffn == "swiglu"  # |g1|^2 for the SwiGLU shortcut of the conflict scores
        sq1_A = grad_h_AH = None
        if ffn == "swiglu" and not (need_x or need_win):
            # nothing reads grad_h (the stop layer of two_pass's first pass): only |g1|^2
            if with_sq:
                acc = torch.promote_types(grad_a_AF.dtype, torch.float32)
                sq1_A = torch.linalg.vector_norm(grad_a_AF, dim=-1, dtype=acc).square()
        elif ffn == "swiglu" and triton_path:
            grad_h_AH = kernels.swiglu_backward(h_AH, grad_a_AF, with_sq)
        else:
            actb = maybe_compiled(f"actb_{ffn}_{with_sq}", act_backward, h_AH)
            grad_h_AH = actb(ffn, h_AH, grad_a_AF, F_, with_sq)
        if with_sq and grad_h_AH is not None:
            grad_h_AH, sq1_A = grad_h_AH
        g_wout = groups.weight_grad(g2_AD, a_AF) if need_wout else None
        g_win = groups.weight_grad(grad_h_AH, x_AD) if need_win else None
        g_bin = expert_sums(grad_h_AH, expert_A, E) if (ctx.has_bias and need_bin) else None
        g_bout = expert_sums(g2_AD, expert_A, E) if (ctx.has_bias and need_bout) else None
        grad_x_TD = None
        if need_x:
            grad_x_AD = groups.rows_w(grad_h_AH, w_in)
            if ctx.skips_rows:
                _zero_null_rows(grad_x_AD, expert_A, E)
            if triton_path:
                grad_x_TD = kernels.combine(grad_x_AD, pos_TK, None)
            else:
                grad_x_TD = maybe_compiled("combine", combine, grad_x_AD)(grad_x_AD, pos_TK, None)
        grad_logits = None
        if observe:
            grads = TokenGrads(
                g1_AF=grad_a_AF if ffn == "swiglu" else grad_h_AH,
                g2_AD=g2_AD,
                expert_A=expert_A,
                token_A=token_A,
                sq1_A=sq1_A,
                w_out_EDF=w_out.detach() if ffn == "swiglu" else None,
                dy_TD=dy_TD if fast_obs else None,
                sums2_ED=sums2_ED,
                pos_TK=pos_TK,
                order_A=order_A,
                valid_TK=valid_TK,
            )
            grad_logits = observer(ctx.record, grads)
        if keep:
            ctx.kept_grads = (grad_x_TD, grad_w_TK, None, g_win, g_bin, g_wout, g_bout) + (None,) * 4
        return (grad_x_TD, grad_w_TK, grad_logits, g_win, g_bin, g_wout, g_bout) + (None,) * 4
