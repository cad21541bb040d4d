"""The fused routing: deterministic softmax top-k (``stgc.moe.routers.softmax_topk``, no capacity, no
sampling), the load-balancing loss, the stable expert sort and the token gather in two Triton launches, and
their backward in one (CUDA; on CPU tensors through Triton's interpreter in tests).

Why kernels: at the shapes this project trains, the block's GPU work is a handful of large grouped GEMMs,
and what is left is host time. At the start of a step the GPU waits for the host to issue the routing; the
eager routing and sort are dozens of small launches, these are two, and the routing then issues the first
expert product itself (``issue_first_product``) before the host builds anything else
(results/bench/README.md has the profiles). Products with the few experts are row-wise products summed
along D in fp32, one expert at a time, on 2-D tiles: fp32 ``tl.dot`` has no tensor cores, and a reduction
over the middle axis of a 3-D product gave wrong router gradients under Triton 3.6 (the interpreter was
right).

Shape legend as in ``stgc.moe.record``. ``*_PAD`` sizes are powers of two (tl.arange).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from stgc.moe.fused import launch
from stgc.moe.fused.launch import pad

# --------------------------------------------------------------------------------------------------------
# routing: router logits, softmax, top-k, combine weights, load-balancing partial sums (one kernel), then
# the aux loss, per-expert counts, the stable expert sort and the token gather (a second kernel)


@triton.jit
def _route_kernel(
    x_ptr,
    w_ptr,
    mask_ptr,
    logits_ptr,
    probs_ptr,
    weights_ptr,
    index_buf_ptr,
    float_buf_ptr,
    assign_count_ptr,
    mask_out_ptr,
    T,
    D,
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    HAS_MASK: tl.constexpr,
    COUNT_PADDING: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # packed buffers: layout in ``RoutingBuffers``
    topk_ptr = index_buf_ptr
    part_ptr = float_buf_ptr + T * K + E + 1
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    ce = tl.arange(0, E_PAD)
    emask = ce < E
    # logits = x W^T with x upcast to fp32 and fp32 products and sums (the router "computed in fp32"); E is
    # small: one row-wise product and sum per expert (no matrix instructions, no fp32 tensor-core rounding)
    acc = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dc = d0 + tl.arange(0, BLOCK_D)
        dm = dc < D
        xb = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * D + dc[None, :], mask=rmask[:, None] & dm[None, :], other=0.0
        ).to(tl.float32)
        for e in tl.static_range(E):
            w_e = tl.load(w_ptr + e * D + dc, mask=dm, other=0.0).to(tl.float32)
            acc += tl.where(ce[None, :] == e, tl.sum(xb * w_e[None, :], axis=1)[:, None], 0.0)
    z = tl.where(emask[None, :], acc, float("-inf"))
    ez = tl.exp(z - tl.max(z, axis=1)[:, None])
    p = ez / tl.sum(ez, axis=1)[:, None]
    out2 = rows[:, None] * E + ce[None, :]
    m2 = rmask[:, None] & emask[None, :]
    tl.store(logits_ptr + out2, acc, mask=m2)
    tl.store(probs_ptr + out2, p, mask=m2)

    if HAS_MASK:
        real = (tl.load(mask_ptr + rows, mask=rmask, other=0) != 0) & rmask
    else:
        real = rmask
    tl.store(mask_out_ptr + rows, real.to(tl.int8), mask=rmask)
    counted = rmask if COUNT_PADDING else real  # tokens in L_aux
    kept = rmask if COUNT_PADDING else real  # tokens whose assignments carry weight

    # top-k by repeated argmax (ties: the lower expert index first, as the eager router); a NaN probability
    # counts as the largest (as torch.topk has it), so a padded column is never chosen
    ck = tl.arange(0, K_PAD)
    rem = tl.where(emask[None, :], tl.where(p != p, 2.0, p), -1.0)
    idx_TK = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    top_TK = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    assign_count = tl.zeros([E_PAD], dtype=tl.int32)
    counted_count = tl.zeros([E_PAD], dtype=tl.float32)
    f1 = tl.zeros([E_PAD], dtype=tl.float32)
    for k in tl.static_range(K):
        idx = tl.minimum(tl.argmax(rem, axis=1), E - 1)
        sel = ce[None, :] == idx[:, None]
        pk = tl.sum(tl.where(sel, p, 0.0), axis=1)
        idx_TK = tl.where(ck[None, :] == k, idx[:, None], idx_TK)
        top_TK = tl.where(ck[None, :] == k, pk[:, None], top_TK)
        rem = tl.where(sel, -1.0, rem)
        assign_count += tl.sum((sel & rmask[:, None]).to(tl.int32), axis=0)
        counted_count += tl.sum((sel & real[:, None]).to(tl.float32), axis=0)
        if k == 0:
            f1 = tl.sum((sel & counted[:, None]).to(tl.float32), axis=0)
    top_TK = tl.where(kept[:, None], top_TK, 0.0)
    w_TK = top_TK / tl.maximum(tl.sum(top_TK, axis=1), 1.1920928955078125e-07)[:, None]
    outk = rows[:, None] * K + ck[None, :]
    mk = rmask[:, None] & (ck[None, :] < K)
    tl.store(topk_ptr + outk, idx_TK.to(tl.int64), mask=mk)
    tl.store(weights_ptr + outk, w_TK, mask=mk)

    # partial sums of this block: [P_e, f_e count, tokens-per-expert count, n counted] in fp32 (exact
    # counts below 2^24 per block) and the assignment counts per expert in int32
    psum = tl.sum(tl.where(counted[:, None], p, 0.0), axis=0)
    base = part_ptr + pid * 4 * E_PAD
    tl.store(base + ce, psum)
    tl.store(base + E_PAD + ce, f1)
    tl.store(base + 2 * E_PAD + ce, counted_count)
    n_counted = tl.sum(counted.to(tl.float32), axis=0)
    tl.store(base + 3 * E_PAD + ce, tl.where(ce == 0, n_counted, 0.0))
    tl.store(assign_count_ptr + pid * E_PAD + ce, assign_count)


@triton.jit
def _dispatch_kernel(
    index_buf_ptr,
    weights_ptr,
    float_buf_ptr,
    count_buf_ptr,
    aux_ptr,
    tpe_ptr,
    x_ptr,
    xa_ptr,
    T,
    D,
    nprog,
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    NP_PAD: tl.constexpr,
    GATHER: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Grid: (token blocks, column blocks of the gather); every program ranks its tokens' assignments,
    # column block 0 writes the indices. Buffers (``route_and_dispatch``), A = T*K:
    # packed buffers: layout in ``RoutingBuffers``
    A = T * K
    topk_ptr = index_buf_ptr
    pos_ptr = index_buf_ptr + A
    order_ptr = index_buf_ptr + 2 * A
    expert_ptr = index_buf_ptr + 3 * A
    token_ptr = index_buf_ptr + 4 * A
    wa_ptr = float_buf_ptr
    f_ptr = float_buf_ptr + A
    part_ptr = float_buf_ptr + A + E + 1
    assign_count_ptr = count_buf_ptr
    offs_ptr = count_buf_ptr + nprog * E_PAD
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    ce = tl.arange(0, E_PAD)
    pr = tl.arange(0, NP_PAD)
    assign_count = tl.load(
        assign_count_ptr + pr[:, None] * E_PAD + ce[None, :], mask=pr[:, None] < nprog, other=0
    )
    total = tl.sum(assign_count, axis=0)
    before = tl.sum(tl.where(pr[:, None] < pid, assign_count, 0), axis=0)
    # first sorted position of this block's rows of expert e: all rows of experts < e, then earlier blocks'
    base_E = tl.cumsum(total, axis=0) - total + before

    ck = tl.arange(0, K_PAD)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    vk = rmask[:, None] & (ck[None, :] < K)
    a_TK = rows[:, None] * K + ck[None, :]
    idx_TK = tl.load(topk_ptr + a_TK, mask=vk, other=0).to(tl.int32)
    onehot = ((idx_TK[:, :, None] == ce[None, None, :]) & vk[:, :, None]).to(tl.int32)
    oh = tl.reshape(onehot, (BLOCK_T * K_PAD, E_PAD))  # rows in (token, slot) order: a stable sort
    rank = tl.cumsum(oh, axis=0) - 1 + base_E[None, :]
    pos = tl.reshape(tl.sum(tl.where(oh != 0, rank, 0), axis=1), (BLOCK_T, K_PAD))
    if pid_d == 0:
        tl.store(pos_ptr + a_TK, pos.to(tl.int64), mask=vk)
        tl.store(order_ptr + pos, a_TK.to(tl.int64), mask=vk)
        tl.store(expert_ptr + pos, idx_TK.to(tl.int64), mask=vk)
        tl.store(token_ptr + pos, (rows[:, None] + 0 * ck[None, :]).to(tl.int64), mask=vk)
        tl.store(wa_ptr + pos, tl.load(weights_ptr + a_TK, mask=vk, other=0.0), mask=vk)
    if GATHER:
        dc = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        xm = rmask[:, None] & (dc < D)[None, :]
        xb = tl.load(x_ptr + rows[:, None].to(tl.int64) * D + dc[None, :], mask=xm)
        for k in tl.static_range(K):
            pos_k = tl.sum(tl.where(ck[None, :] == k, pos, 0), axis=1).to(tl.int64)
            tl.store(xa_ptr + pos_k[:, None] * D + dc[None, :], xb, mask=xm)

    if (pid == 0) & (pid_d == 0):
        tl.store(offs_ptr + ce, tl.cumsum(total, axis=0), mask=ce < E)
        pm = pr[:, None] < nprog
        pbase = part_ptr + pr[:, None] * 4 * E_PAD + ce[None, :]
        P = tl.sum(tl.load(pbase, mask=pm, other=0.0), axis=0)
        f = tl.sum(tl.load(pbase + E_PAD, mask=pm, other=0.0), axis=0)
        tpe = tl.sum(tl.load(pbase + 2 * E_PAD, mask=pm, other=0.0), axis=0)
        n = tl.maximum(tl.sum(tl.sum(tl.load(pbase + 3 * E_PAD, mask=pm, other=0.0), axis=0), axis=0), 1.0)
        f = f / n
        tl.store(aux_ptr, E * tl.sum(f * (P / n), axis=0))
        tl.store(f_ptr + ce, f, mask=ce < E)
        tl.store(f_ptr + E, n)
        tl.store(tpe_ptr + ce, tpe.to(tl.int64), mask=ce < E)


class RoutingBuffers:
    """The routing's packed output buffers, allocated once per forward (each allocation and each kernel
    argument costs host time), and their layout, the one the two kernels index (A = T*K, P = programs of
    the forward kernels, E_PAD = pad(E)):

    index_buf int64: [topk (A) | pos (A) | order (A) | expert (A) | token (A)]
    float_buf fp32:  [w_A (A) | f_E (E) | n_real (1) | partial sums (P * 4 * E_PAD)]
    count_buf int32: [assignment counts per program and expert (P * E_PAD) | offsets (E)]

    ``empty``, not zeros: the kernels write every entry (a fill would be one more launch).
    """

    def __init__(self, T: int, E: int, K: int, programs: int, device: torch.device):
        A, E_PAD, P = T * K, pad(E), max(programs, 1)
        self.T, self.E, self.K, self.P, self.E_PAD = T, E, K, P, E_PAD
        self.index_buf = torch.empty(5 * A, device=device, dtype=torch.int64)
        self.float_buf = torch.empty(A + E + 1 + P * 4 * E_PAD, device=device, dtype=torch.float32)
        self.count_buf = torch.empty(P * E_PAD + E, device=device, dtype=torch.int32)

    def zero(self) -> None:
        """The result of routing no tokens (n_real is clamped to 1, as the kernel clamps it)."""
        self.index_buf.zero_(), self.float_buf.zero_(), self.count_buf.zero_()
        self.float_buf[self.T * self.K + self.E] = 1.0

    def offsets_E(self) -> Tensor:
        return self.count_buf[self.P * self.E_PAD :]

    def index_views(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """topk_TK, pos_TK, order_A, expert_A, token_A."""
        T, K = self.T, self.K
        topk, pos, order, expert, token = self.index_buf.view(5, T * K).unbind(0)
        return topk.view(T, K), pos.view(T, K), order, expert, token

    def float_views(self) -> tuple[Tensor, Tensor, Tensor]:
        """w_A, f_E, n_real."""
        A, E = self.T * self.K, self.E
        return self.float_buf[:A], self.float_buf[A : A + E], self.float_buf[A + E : A + E + 1]


@dataclasses.dataclass
class Routed:
    """What ``route_and_dispatch`` computes (``stgc.moe.routers.softmax_topk.route`` defines it).

    logits_TE, probs_TE, topk_TK (int64), weights_TK: per token. aux: E * sum_e f_e P_e (0-dim).
    f_E: top-1 shares over counted tokens; n_real: their number (>= 1, fp32). tokens_per_expert_E: int64.
    pos_TK: sorted row of each (token, slot); order_A / expert_A / token_A: per sorted row; w_A: its combine
    weight; x_AD: x's row of its token (``None`` without ``gather``); offsets_E: int32 inclusive end of
    each expert's rows (``torch._grouped_mm``'s offsets). token_mask_T: real tokens (a fresh bool tensor).
    first_product: what the caller's ``issue_first_product`` returned (``None`` without it).
    """

    logits_TE: Tensor
    probs_TE: Tensor
    topk_TK: Tensor
    weights_TK: Tensor
    aux: Tensor
    f_E: Tensor
    n_real: Tensor
    tokens_per_expert_E: Tensor
    pos_TK: Tensor
    order_A: Tensor
    expert_A: Tensor
    token_A: Tensor
    w_A: Tensor
    x_AD: Tensor | None
    offsets_E: Tensor
    token_mask_T: Tensor
    first_product: object = None


def route_and_dispatch(
    x_TD: Tensor,
    w_ED: Tensor,
    token_mask_T: Tensor | None,
    top_k: int,
    count_padding: bool,
    gather: bool,
    issue_first_product: Callable[[Tensor | None, Tensor], object] | None = None,
) -> Routed:
    """Deterministic top-k routing (``stgc.moe.routers.softmax_topk.route`` without capacity or sampling)
    and the stable expert sort of ``stgc.moe.dispatch.sort_assignments`` in two launches. ``token_mask_T``:
    real tokens (``None``: all). ``count_padding``: MoE-LLaVA's ``route_padding`` (padding counts in L_aux
    and carries weight). ``issue_first_product(x_AD, offsets_E)``, if given, is called as soon as both
    launches are issued (at once when T = 0), before the host builds the rest of the result
    (``Routed.first_product``): the block issues its first expert product there, so that the GPU, which has
    nothing else to do at the start of a step, gets it as early as possible."""
    T, D = x_TD.shape
    E, K = w_ED.shape[0], top_k
    E_PAD, K_PAD = pad(E), pad(K)
    dev = x_TD.device
    x_TD, w_ED = x_TD.contiguous(), w_ED.contiguous()
    nprog = triton.cdiv(T, launch.ROUTE_BLOCK_T)
    # the differentiable outputs in their own tensors, the rest in the packed buffers
    logits = torch.empty(T, E, device=dev, dtype=torch.float32)
    probs = torch.empty_like(logits)
    weights = torch.empty(T, K, device=dev, dtype=torch.float32)
    aux = torch.empty((), device=dev, dtype=torch.float32)
    bufs = RoutingBuffers(T, E, K, nprog, dev)
    tpe = torch.empty(E, device=dev, dtype=torch.int64)  # (its own: a caller may all-reduce it in place)
    mask_out = torch.empty(T, device=dev, dtype=torch.bool)
    x_AD = torch.empty(T * K, D, device=dev, dtype=x_TD.dtype) if gather else None
    # (the logits stand in for pointers a kernel does not read under its flags)
    mask = logits if token_mask_T is None else token_mask_T.contiguous().view(torch.uint8)
    if T:
        _route_kernel[(nprog,)](
            x_TD, w_ED, mask, logits, probs, weights, bufs.index_buf, bufs.float_buf, bufs.count_buf,
            mask_out.view(torch.uint8), T, D, E=E, E_PAD=E_PAD, K=K, K_PAD=K_PAD,
            HAS_MASK=token_mask_T is not None, COUNT_PADDING=count_padding, BLOCK_T=launch.ROUTE_BLOCK_T,
            BLOCK_D=launch.ROUTE_BLOCK_D, num_warps=launch.ROUTE_WARPS,
        )  # fmt: skip
        grid = (nprog, triton.cdiv(D, launch.GATHER_BLOCK_D) if gather else 1)
        _dispatch_kernel[grid](
            bufs.index_buf, weights, bufs.float_buf, bufs.count_buf, aux, tpe, x_TD,
            x_AD if gather else x_TD, T, D, nprog, E=E, E_PAD=E_PAD, K=K, K_PAD=K_PAD, NP_PAD=pad(nprog),
            GATHER=gather, BLOCK_T=launch.ROUTE_BLOCK_T, BLOCK_D=launch.GATHER_BLOCK_D,
            num_warps=4 if nprog <= 256 else 8,
        )  # fmt: skip
    else:
        bufs.zero()
        aux.zero_(), tpe.zero_()
    offsets = bufs.offsets_E()
    first = issue_first_product(x_AD, offsets) if issue_first_product is not None else None
    topk, pos, order, expert, token = bufs.index_views()
    w_A, f_E, n_real = bufs.float_views()
    return Routed(
        logits, probs, topk, weights, aux, f_E, n_real, tpe, pos, order, expert, token, w_A, x_AD, offsets,
        mask_out, first,
    )  # fmt: skip


@triton.jit
def _route_bwd_kernel(
    x_ptr,
    w_ptr,
    mask_ptr,
    probs_ptr,
    topk_ptr,
    weights_ptr,
    f_ptr,
    n_ptr,
    gz_ptr,
    gp_ptr,
    gw_ptr,
    gaux_ptr,
    dx_ptr,
    dwpart_ptr,
    T,
    D,
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    K: tl.constexpr,
    HAS_MASK: tl.constexpr,
    COUNT_PADDING: tl.constexpr,
    HAS_GZ: tl.constexpr,
    HAS_GP: tl.constexpr,
    HAS_GW: tl.constexpr,
    HAS_GAUX: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    ce = tl.arange(0, E_PAD)
    emask = ce < E
    m2 = rmask[:, None] & emask[None, :]
    e2 = rows[:, None] * E + ce[None, :]
    p = tl.load(probs_ptr + e2, mask=m2, other=0.0)
    if HAS_MASK:
        real = (tl.load(mask_ptr + rows, mask=rmask, other=0) != 0) & rmask
    else:
        real = rmask
    counted = rmask if COUNT_PADDING else real
    kept = rmask if COUNT_PADDING else real
    dp = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
    if HAS_GP:
        dp += tl.load(gp_ptr + e2, mask=m2, other=0.0)
    if HAS_GAUX:
        # L_aux = E sum_e f_e mean_t p_te (f constant): dL/dp_te = E f_e / n for counted tokens
        coef = tl.load(gaux_ptr) * E / tl.load(n_ptr)
        f = tl.load(f_ptr + ce, mask=emask, other=0.0)
        dp += tl.where(counted[:, None], coef * f[None, :], 0.0)
    if HAS_GW:
        # w_k = p_k / s over the chosen experts (kept tokens): dL/dp_j = (g_j - sum_k g_k w_k) / s
        s = tl.zeros([BLOCK_T], dtype=tl.float32)
        sw = tl.zeros([BLOCK_T], dtype=tl.float32)
        for k in tl.static_range(K):
            idx = tl.load(topk_ptr + rows * K + k, mask=rmask, other=0).to(tl.int32)
            s += tl.sum(tl.where(ce[None, :] == idx[:, None], p, 0.0), axis=1)
            gw = tl.load(gw_ptr + rows * K + k, mask=rmask, other=0.0)
            sw += gw * tl.load(weights_ptr + rows * K + k, mask=rmask, other=0.0)
        s = tl.maximum(s, 1.1920928955078125e-07)
        for k in tl.static_range(K):
            idx = tl.load(topk_ptr + rows * K + k, mask=rmask, other=0).to(tl.int32)
            gw = tl.load(gw_ptr + rows * K + k, mask=rmask, other=0.0)
            add = tl.where(kept, (gw - sw) / s, 0.0)
            dp += tl.where(ce[None, :] == idx[:, None], add[:, None], 0.0)
    dz = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    if HAS_GZ:
        dz += tl.load(gz_ptr + e2, mask=m2, other=0.0)
    dz = tl.where(m2, dz, 0.0)
    # this program's BLOCK_D columns (grid axis 1; every column block recomputes dz: a few loads per token):
    # dx = dz W (fp32, rounded to x's dtype); this token block's share of dW = dz^T x, one expert at a time
    dc = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = dc < D
    xm = rmask[:, None] & dm[None, :]
    xo = rows[:, None].to(tl.int64) * D + dc[None, :]
    xb = tl.load(x_ptr + xo, mask=xm, other=0.0).to(tl.float32)
    dxb = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for e in tl.static_range(E):
        dz_e = tl.sum(tl.where(ce[None, :] == e, dz, 0.0), axis=1)
        w_e = tl.load(w_ptr + e * D + dc, mask=dm, other=0.0).to(tl.float32)
        dxb += dz_e[:, None] * w_e[None, :]
        dw_off = (pid.to(tl.int64) * E + e) * D + dc
        tl.store(dwpart_ptr + dw_off, tl.sum(dz_e[:, None] * xb, axis=0), mask=dm)
    tl.store(dx_ptr + xo, dxb.to(dx_ptr.dtype.element_ty), mask=xm)


def route_backward(
    x_TD: Tensor,
    w_ED: Tensor,
    token_mask_T: Tensor | None,
    count_padding: bool,
    probs_TE: Tensor,
    topk_TK: Tensor,
    weights_TK: Tensor,
    f_E: Tensor,
    n_real: Tensor,
    g_logits: Tensor | None,
    g_probs: Tensor | None,
    g_weights: Tensor | None,
    g_aux: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(dL/dx in x's dtype, dL/dW in fp32) of ``route_and_dispatch``'s differentiable outputs (logits,
    probs, weights, aux): the softmax, renormalisation and load-balancing gradients in closed form."""
    T, D = x_TD.shape
    E, K = w_ED.shape[0], topk_TK.shape[1]
    nprog = triton.cdiv(T, launch.ROUTE_BWD_BLOCK_T)
    x_TD = x_TD.contiguous()
    dx = torch.empty(T, D, device=x_TD.device, dtype=x_TD.dtype)  # (row-major, as the kernel writes it)
    dwpart = torch.empty(max(nprog, 1), E, D, device=x_TD.device, dtype=torch.float32)
    mask = probs_TE if token_mask_T is None else token_mask_T.contiguous().view(torch.uint8)
    dummy = probs_TE

    def c(t):
        return dummy if t is None else t.contiguous()

    if T:
        _route_bwd_kernel[(nprog, triton.cdiv(D, launch.ROUTE_BWD_BLOCK_D))](
            x_TD, w_ED.contiguous(), mask, c(probs_TE), c(topk_TK), c(weights_TK), f_E, n_real,
            c(g_logits), c(g_probs), c(g_weights), c(g_aux), dx, dwpart, T, D,
            E=E, E_PAD=pad(E), K=K, HAS_MASK=token_mask_T is not None, COUNT_PADDING=count_padding,
            HAS_GZ=g_logits is not None, HAS_GP=g_probs is not None, HAS_GW=g_weights is not None,
            HAS_GAUX=g_aux is not None, BLOCK_T=launch.ROUTE_BWD_BLOCK_T, BLOCK_D=launch.ROUTE_BWD_BLOCK_D,
            num_warps=launch.ROUTE_BWD_WARPS,
        )  # fmt: skip
    else:
        dwpart.zero_()
    return dx, dwpart.sum(0)
