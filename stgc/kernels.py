"""Hand-written Triton kernels for the MoE block and the fused STGC observer (CUDA; imported lazily).

Why kernels: at the shapes this project trains, the block's GPU work is a handful of large grouped GEMMs,
and what is left is host time. At the start of a step the GPU waits for the host to issue the routing:
the eager block issued 99 kernel launches per forward+backward and reached its first expert product
1.45 ms into the step on an H200 machine, this one 23 launches and 0.55 ms
(`results/bench/history/profile_steps-6ba4cd2.txt`; across this project's H200 profiles an eager op costs
7-8 us of host time, a Triton launch 20-40 us, a compiled call 29-49 us), and 0.36-0.48 ms since the
routing issues the first product itself (``route_and_dispatch``'s ``then``; `profile_steps.txt`). Here the
routing is two launches, the dispatch (expert sort and token gather) is inside the second, and each
elementwise pass of the expert path is one launch. With ``TRITON_INTERPRET=1`` every kernel also runs
on CPU tensors (the tests hold each one equal to the eager code it replaces).

Shape legend as in ``stgc.moe``: T tokens, D model dim, E experts, K top-k, A = T*K assignment rows in
expert-sorted order, F expert FFN dim (SwiGLU: h is [gate | up], 2F wide). ``*_PAD`` sizes are powers of
two (tl.arange). Products with the few experts are row-wise products summed along D in fp32, one expert
at a time, on 2-D tiles. Measured on the H200 (`results/bench/profile_steps.txt` and `history/`): the score
kernel took 1.33 ms per four-layer step with fp32 ``tl.dot`` (no tensor cores) and 0.16 ms with row-wise
products; the router kernel 0.19 ms at 8192 tokens with a 3-D broadcast product and 0.04 ms with 2-D
tiles; and a reduction over the middle axis of a 3-D product gave wrong router gradients under Triton 3.6
while the interpreter was right. Only the per-expert sums of bf16 rows use ``tl.dot`` (a one-hot matrix
is exact in bf16, the accumulation fp32).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

# Launch shapes of the block's memory-bound kernels (tokens / rows and columns per program, warps), picked
# on the H200 with `results/bench/kernel_tuning.py`, module-level so that the sweep (and the tests) can
# set them; the score kernel's and the SwiGLU passes' shapes are set where they are launched.
ROUTE_BLOCK_T = 32  # tokens per program of the forward routing kernels (and of the token-wise score kernel)
ROUTE_BLOCK_D = 128  # columns per step of the router kernel's product
ROUTE_WARPS = 8
GATHER_BLOCK_D = 256  # columns per program of the dispatch's token gather
ROUTE_BWD_BLOCK_T, ROUTE_BWD_BLOCK_D, ROUTE_BWD_WARPS = 64, 128, 2  # the routing's backward (2-D grid)
ROW_BLOCK = 64  # assignment rows per program of the row kernels
ROWDOT_BLOCK_D, ROWDOT_WARPS = 128, 4
COMBINE_BLOCK_T, COMBINE_BLOCK_D, COMBINE_WARPS = 16, 128, 8


def _pad(n: int, least: int = 2) -> int:
    return max(least, triton.next_power_of_2(n))


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
    ib_ptr,
    fb_ptr,
    acnt_ptr,
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
    # buffers (``route_and_dispatch``): ib = [topk | ...] int64, fb = [... | partial sums] fp32
    topk_ptr = ib_ptr
    part_ptr = fb_ptr + T * K + E + 1
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

    # top-k by repeated argmax (ties: the lower expert index first, as ``stgc.moe.route``); a NaN
    # probability counts as the largest (as torch.topk has it), so a padded column is never chosen
    ck = tl.arange(0, K_PAD)
    rem = tl.where(emask[None, :], tl.where(p != p, 2.0, p), -1.0)
    idx_TK = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    top_TK = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    acnt = tl.zeros([E_PAD], dtype=tl.int32)
    ccnt = tl.zeros([E_PAD], dtype=tl.float32)
    f1 = tl.zeros([E_PAD], dtype=tl.float32)
    for k in tl.static_range(K):
        idx = tl.minimum(tl.argmax(rem, axis=1), E - 1)
        sel = ce[None, :] == idx[:, None]
        pk = tl.sum(tl.where(sel, p, 0.0), axis=1)
        idx_TK = tl.where(ck[None, :] == k, idx[:, None], idx_TK)
        top_TK = tl.where(ck[None, :] == k, pk[:, None], top_TK)
        rem = tl.where(sel, -1.0, rem)
        acnt += tl.sum((sel & rmask[:, None]).to(tl.int32), axis=0)
        ccnt += tl.sum((sel & real[:, None]).to(tl.float32), axis=0)
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
    tl.store(base + 2 * E_PAD + ce, ccnt)
    n_counted = tl.sum(counted.to(tl.float32), axis=0)
    tl.store(base + 3 * E_PAD + ce, tl.where(ce == 0, n_counted, 0.0))
    tl.store(acnt_ptr + pid * E_PAD + ce, acnt)


@triton.jit
def _dispatch_kernel(
    ib_ptr,
    weights_ptr,
    fb_ptr,
    i32_ptr,
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
    # ib = [topk | pos | order | expert | token] int64 (A each),
    # fb = [w_A (A) | f_E (E) | n_real | partial sums] fp32, i32 = [assignment counts | offsets (E)].
    A = T * K
    topk_ptr = ib_ptr
    pos_ptr = ib_ptr + A
    order_ptr = ib_ptr + 2 * A
    expert_ptr = ib_ptr + 3 * A
    token_ptr = ib_ptr + 4 * A
    wa_ptr = fb_ptr
    f_ptr = fb_ptr + A
    part_ptr = fb_ptr + A + E + 1
    acnt_ptr = i32_ptr
    offs_ptr = i32_ptr + nprog * E_PAD
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    ce = tl.arange(0, E_PAD)
    pr = tl.arange(0, NP_PAD)
    acnt = tl.load(acnt_ptr + pr[:, None] * E_PAD + ce[None, :], mask=pr[:, None] < nprog, other=0)
    total = tl.sum(acnt, axis=0)
    before = tl.sum(tl.where(pr[:, None] < pid, acnt, 0), axis=0)
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


@dataclasses.dataclass
class Routed:
    """What ``route_and_dispatch`` computes (see ``stgc.moe.route`` for the definitions).

    logits_TE, probs_TE, topk_TK (int64), weights_TK: per token. aux: E * sum_e f_e P_e (0-dim).
    f_E: top-1 shares over counted tokens; n_real: their number (>= 1, fp32). tokens_per_expert_E: int64.
    pos_TK: sorted row of each (token, slot); order_A / expert_A / token_A: per sorted row; w_A: its combine
    weight; x_AD: x's row of its token (``None`` without ``gather``); offsets_E: int32 inclusive end of
    each expert's rows (``torch._grouped_mm``'s offsets). token_mask_T: real tokens (a fresh bool tensor).
    first: what the caller's ``then`` returned (``None`` without it).
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
    first: object = None


def route_and_dispatch(
    x_TD: Tensor,
    w_ED: Tensor,
    token_mask_T: Tensor | None,
    top_k: int,
    count_padding: bool,
    gather: bool,
    then: Callable[[Tensor | None, Tensor], object] | None = None,
) -> Routed:
    """Deterministic top-k routing of ``stgc.moe.route`` (no capacity, no sampling) and the expert sort of
    ``MoEBlock._dispatch`` in two launches. ``token_mask_T``: real tokens (``None``: all). ``count_padding``:
    MoE-LLaVA's ``route_padding`` (padding counts in L_aux and carries weight). ``then(x_AD, offsets_E)``,
    if given, is called as soon as both launches are issued (at once when T = 0), before the host builds
    the rest of the result
    (``Routed.first``): the block issues its first expert product there, so that the GPU, which has
    nothing else to do at the start of a step, gets it as early as possible."""
    T, D = x_TD.shape
    E, K = w_ED.shape[0], top_k
    E_PAD, K_PAD = _pad(E), _pad(K)
    dev = x_TD.device
    x_TD, w_ED = x_TD.contiguous(), w_ED.contiguous()
    nprog = triton.cdiv(T, ROUTE_BLOCK_T)
    A = T * K
    # few allocations (each one, and each kernel argument, costs host time): the differentiable outputs,
    # then one int64, one fp32 and one int32 buffer for the rest (layout in ``_dispatch_kernel``); empty,
    # not zeros: the kernels write every entry (a fill would be one more launch)
    logits = torch.empty(T, E, device=dev, dtype=torch.float32)
    probs = torch.empty_like(logits)
    weights = torch.empty(T, K, device=dev, dtype=torch.float32)
    aux = torch.empty((), device=dev, dtype=torch.float32)
    ib = torch.empty(5 * A, device=dev, dtype=torch.int64)
    tpe = torch.empty(E, device=dev, dtype=torch.int64)  # (its own: a caller may all-reduce it in place)
    fb = torch.empty(A + E + 1 + max(nprog, 1) * 4 * E_PAD, device=dev, dtype=torch.float32)
    i32 = torch.empty(max(nprog, 1) * E_PAD + E, device=dev, dtype=torch.int32)
    mask_out = torch.empty(T, device=dev, dtype=torch.bool)
    x_AD = torch.empty(A, D, device=dev, dtype=x_TD.dtype) if gather else None
    # (the logits stand in for pointers a kernel does not read under its flags)
    mask = logits if token_mask_T is None else token_mask_T.contiguous().view(torch.uint8)
    if T:
        _route_kernel[(nprog,)](
            x_TD, w_ED, mask, logits, probs, weights, ib, fb, i32, mask_out.view(torch.uint8), T, D,
            E=E, E_PAD=E_PAD, K=K, K_PAD=K_PAD, HAS_MASK=token_mask_T is not None,
            COUNT_PADDING=count_padding, BLOCK_T=ROUTE_BLOCK_T, BLOCK_D=ROUTE_BLOCK_D, num_warps=ROUTE_WARPS,
        )  # fmt: skip
        grid = (nprog, triton.cdiv(D, GATHER_BLOCK_D) if gather else 1)
        _dispatch_kernel[grid](
            ib, weights, fb, i32, aux, tpe, x_TD, x_AD if gather else x_TD, T, D, nprog,
            E=E, E_PAD=E_PAD, K=K, K_PAD=K_PAD, NP_PAD=_pad(nprog), GATHER=gather,
            BLOCK_T=ROUTE_BLOCK_T, BLOCK_D=GATHER_BLOCK_D, num_warps=4 if nprog <= 256 else 8,
        )  # fmt: skip
    else:
        ib.zero_(), fb.zero_(), i32.zero_(), aux.zero_(), tpe.zero_()
        fb[A + E] = 1.0
    offsets = i32[max(nprog, 1) * E_PAD :]
    first = then(x_AD, offsets) if then is not None else None
    topk, pos, order, expert, token = ib.view(5, A).unbind(0)
    return Routed(
        logits, probs, topk.view(T, K), weights, aux, fb[A : A + E], fb[A + E : A + E + 1], tpe,
        pos.view(T, K), order, expert, token, fb[:A], x_AD, offsets, mask_out, first,
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
    nprog = triton.cdiv(T, ROUTE_BWD_BLOCK_T)
    x_TD = x_TD.contiguous()
    dx = torch.empty(T, D, device=x_TD.device, dtype=x_TD.dtype)  # (row-major, as the kernel writes it)
    dwpart = torch.empty(max(nprog, 1), E, D, device=x_TD.device, dtype=torch.float32)
    mask = probs_TE if token_mask_T is None else token_mask_T.contiguous().view(torch.uint8)
    dummy = probs_TE

    def c(t):
        return dummy if t is None else t.contiguous()

    if T:
        _route_bwd_kernel[(nprog, triton.cdiv(D, ROUTE_BWD_BLOCK_D))](
            x_TD, w_ED.contiguous(), mask, c(probs_TE), c(topk_TK), c(weights_TK), f_E, n_real,
            c(g_logits), c(g_probs), c(g_weights), c(g_aux), dx, dwpart, T, D,
            E=E, E_PAD=_pad(E), K=K, HAS_MASK=token_mask_T is not None, COUNT_PADDING=count_padding,
            HAS_GZ=g_logits is not None, HAS_GP=g_probs is not None, HAS_GW=g_weights is not None,
            HAS_GAUX=g_aux is not None, BLOCK_T=ROUTE_BWD_BLOCK_T, BLOCK_D=ROUTE_BWD_BLOCK_D,
            num_warps=ROUTE_BWD_WARPS,
        )  # fmt: skip
    else:
        dwpart.zero_()
    return dx, dwpart.sum(0)


# --------------------------------------------------------------------------------------------------------
# the expert path's elementwise passes


@triton.jit
def _swiglu_fwd_kernel(h_ptr, a_ptr, A, F, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    m = (rows < A)[:, None] & (cols < F)[None, :]
    r64 = rows[:, None].to(tl.int64)
    gate = tl.load(h_ptr + r64 * 2 * F + cols[None, :], mask=m, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + r64 * 2 * F + F + cols[None, :], mask=m, other=0.0).to(tl.float32)
    a = gate * tl.sigmoid(gate) * up
    tl.store(a_ptr + r64 * F + cols[None, :], a.to(a_ptr.dtype.element_ty), mask=m)


def swiglu_forward(h_AH: Tensor) -> Tensor:
    """silu(gate) * up of h = [gate | up] (fp32 math, h's dtype out)."""
    A, H = h_AH.shape
    F = H // 2
    h_AH = h_AH.contiguous()
    a = torch.empty(A, F, device=h_AH.device, dtype=h_AH.dtype)
    if A:
        grid = (triton.cdiv(A, 16), triton.cdiv(F, 256))
        _swiglu_fwd_kernel[grid](h_AH, a, A, F, BLOCK_R=16, BLOCK_F=256, num_warps=4)
    return a


@triton.jit
def _swiglu_bwd_kernel(h_ptr, ga_ptr, out_ptr, sq_ptr, F, WITH_SQ: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    h_row = h_ptr + row * 2 * F
    out_row = out_ptr + row * 2 * F
    ga_row = ga_ptr + row * F
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, F, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        m = cols < F
        gate = tl.load(h_row + cols, mask=m, other=0.0).to(tl.float32)
        up = tl.load(h_row + F + cols, mask=m, other=0.0).to(tl.float32)
        ga = tl.load(ga_row + cols, mask=m, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        d_gate = ga * up * sig * (1 + gate * (1 - sig))
        d_up = ga * gate * sig
        tl.store(out_row + cols, d_gate.to(out_ptr.dtype.element_ty), mask=m)
        tl.store(out_row + F + cols, d_up.to(out_ptr.dtype.element_ty), mask=m)
        if WITH_SQ:
            acc += ga * ga
    if WITH_SQ:
        tl.store(sq_ptr + row, tl.sum(acc, axis=0))


def swiglu_backward(h_AH: Tensor, grad_a_AF: Tensor, with_sq: bool) -> Tensor | tuple[Tensor, Tensor]:
    """grad_h = [d silu(gate) * up / d gate, d / d up] applied to grad_a (fp32 math, h's dtype out), and
    with ``with_sq`` |grad_a|^2 per row in fp32 from the same read. h: (A, 2F) = [gate | up], contiguous."""
    A, F = grad_a_AF.shape
    h_AH, grad_a_AF = h_AH.contiguous(), grad_a_AF.contiguous()
    out = torch.empty_like(h_AH)
    sq = torch.empty(A if with_sq else 1, device=h_AH.device, dtype=torch.float32)
    if A:
        _swiglu_bwd_kernel[(A,)](h_AH, grad_a_AF, out, sq, F, WITH_SQ=with_sq, BLOCK=1024, num_warps=4)
    return (out, sq) if with_sq else out


@triton.jit
def _combine_kernel(o_ptr, pos_ptr, w_ptr, y_ptr, T, D, K: tl.constexpr, HAS_W: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rm = rows < T
    m = rm[:, None] & (cols < D)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(K):
        pos = tl.load(pos_ptr + rows * K + k, mask=rm, other=0)
        o = tl.load(o_ptr + pos[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_W:
            o = o * tl.load(w_ptr + rows * K + k, mask=rm, other=0.0)[:, None]
        acc += o
    tl.store(y_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=m)


def combine(o_AD: Tensor, pos_TK: Tensor, w_TK: Tensor | None) -> Tensor:
    """y_t = sum_k w_tk o[pos_tk] (fp32 accumulation, o's dtype out); without ``w_TK`` a plain sum."""
    T, K = pos_TK.shape
    D = o_AD.shape[1]
    o_AD = o_AD.contiguous()
    y = torch.empty(T, D, device=o_AD.device, dtype=o_AD.dtype)
    if T:
        grid = (triton.cdiv(T, COMBINE_BLOCK_T), triton.cdiv(D, COMBINE_BLOCK_D))
        w = w_TK.contiguous() if w_TK is not None else o_AD
        _combine_kernel[grid](o_AD, pos_TK.contiguous(), w, y, T, D, K=K, HAS_W=w_TK is not None,
                              BLOCK_T=COMBINE_BLOCK_T, BLOCK_D=COMBINE_BLOCK_D,
                              num_warps=COMBINE_WARPS)  # fmt: skip
    return y


@triton.jit
def _rowdot_kernel(
    dy_ptr,
    o_ptr,
    token_ptr,
    w_ptr,
    expert_ptr,
    order_ptr,
    valid_ptr,
    gw_ptr,
    g2_ptr,
    part_ptr,
    A,
    D,
    E: tl.constexpr,
    E_DOT: tl.constexpr,
    STATS: tl.constexpr,
    HAS_VALID: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < A
    tok = tl.load(token_ptr + rows, mask=rm, other=0)
    w = tl.load(w_ptr + rows, mask=rm, other=0.0)
    if STATS:
        ex = tl.load(expert_ptr + rows, mask=rm, other=-1)
        use = rm
        if HAS_VALID:
            order = tl.load(order_ptr + rows, mask=rm, other=0)
            use = use & (tl.load(valid_ptr + order, mask=rm, other=0) != 0)
        ce = tl.arange(0, E_DOT)
        # one-hot [E_DOT, rows] of the valid rows' experts: per-expert sums of g2 as one matrix product
        oh = ((ex[None, :] == ce[:, None]) & use[None, :]).to(g2_ptr.dtype.element_ty)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dc = d0 + tl.arange(0, BLOCK_D)
        m = rm[:, None] & (dc < D)[None, :]
        dy = tl.load(dy_ptr + tok[:, None] * D + dc[None, :], mask=m, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + rows[:, None].to(tl.int64) * D + dc[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(dy * o, axis=1)
        g2 = (w[:, None] * dy).to(g2_ptr.dtype.element_ty)
        tl.store(g2_ptr + rows[:, None].to(tl.int64) * D + dc[None, :], g2, mask=m)
        if STATS:
            if IEEE:  # fp32 rows: fp32 products (no tf32 rounding)
                s = tl.dot(oh, g2, input_precision="ieee")
            else:
                s = tl.dot(oh, g2)
            sm = (ce < E)[:, None] & (dc < D)[None, :]
            tl.store(part_ptr + (pid.to(tl.int64) * E + ce[:, None]) * D + dc[None, :], s, mask=sm)
    tl.store(gw_ptr + rows, tl.where(w != 0, acc, 0.0), mask=rm)


def rowdot_scale(
    dy_TD: Tensor,
    token_A: Tensor,
    o_AD: Tensor,
    w_A: Tensor,
    *,
    expert_A: Tensor | None = None,
    num_experts: int = 0,
    order_A: Tensor | None = None,
    valid_TK: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(<dy_t, o_a> in fp32 (0 where w_a = 0), g2_a = w_a dy_t in dy's dtype, and with ``expert_A`` the
    per-expert sums of g2 (fp32 math) over valid rows: E x D fp32, else ``None``) for t = token_A[a].
    A row is valid when ``valid_TK`` (flat, indexed by ``order_A``) says so; all rows without it."""
    A, D = o_AD.shape
    dev = o_AD.device
    gw = torch.empty(A, device=dev, dtype=torch.float32)
    g2 = torch.empty(A, D, device=dev, dtype=dy_TD.dtype)
    stats = expert_A is not None
    nprog = triton.cdiv(A, ROW_BLOCK)
    part = torch.empty(max(nprog, 1), num_experts, D, device=dev, dtype=torch.float32) if stats else gw
    has_valid = valid_TK is not None
    if A:
        _rowdot_kernel[(nprog,)](
            dy_TD.contiguous(), o_AD.contiguous(), token_A, w_A.contiguous(),
            expert_A if stats else token_A, order_A if has_valid else token_A,
            valid_TK.reshape(-1).view(torch.uint8) if has_valid else token_A, gw, g2, part, A, D,
            E=max(num_experts, 1), E_DOT=_pad(num_experts, 16), STATS=stats, HAS_VALID=has_valid,
            IEEE=dy_TD.dtype == torch.float32,
            BLOCK_R=ROW_BLOCK, BLOCK_D=ROWDOT_BLOCK_D, num_warps=ROWDOT_WARPS,
        )  # fmt: skip
    elif stats:
        part.zero_()
    return gw, g2, (part.sum(0) if stats else None)


# --------------------------------------------------------------------------------------------------------
# STGC's conflict scores and CEL gradient, token by token (the fused observer's one pass)

SCORE_CODES = {"mean": 0, "g1": 1, "g2": 2, "concat": 3}


@triton.jit
def _conflict_kernel(
    dy_ptr,
    m2_ptr,
    v_ptr,
    sq1_ptr,
    topk_ptr,
    w_ptr,
    pos_ptr,
    valid_ptr,
    logits_ptr,
    score_ptr,
    cons_ptr,
    conf_ptr,
    gz_ptr,
    part_ptr,
    T,
    D,
    tau,
    zero_norm,
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    SCORE: tl.constexpr,
    HAS_VALID: tl.constexpr,
    CEL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rm = rows < T
    ce = tl.arange(0, E_PAD)
    emask = ce < E
    ck = tl.arange(0, K_PAD)
    vk = rm[:, None] & (ck[None, :] < K)
    e_TK = tl.load(topk_ptr + rows[:, None] * K + ck[None, :], mask=vk, other=0).to(tl.int32)
    # per (token, slot): <dy_t, m2_e> and <dy_t, v_e> of its expert (rows gathered from the E x D means);
    # per expert: |m2_e|^2 and <m2_e, v_e> (= |m1_e|^2: v_e = W_out[e] m1_e, m1_e = W_out[e]^T m2_e)
    d2 = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    d1 = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    sq = tl.zeros([BLOCK_T], dtype=tl.float32)
    mm = tl.zeros([E_PAD], dtype=tl.float32)
    mv = tl.zeros([E_PAD], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dc = d0 + tl.arange(0, BLOCK_D)
        dm = dc < D
        dy = tl.load(
            dy_ptr + rows[:, None].to(tl.int64) * D + dc[None, :], mask=rm[:, None] & dm[None, :], other=0.0
        ).to(tl.float32)
        sq += tl.sum(dy * dy, axis=1)
        for k in tl.static_range(K):
            e = tl.sum(tl.where(ck[None, :] == k, e_TK, 0), axis=1)
            gm = rm[:, None] & dm[None, :]
            m2 = tl.load(m2_ptr + e[:, None] * D + dc[None, :], mask=gm, other=0.0)
            vv = tl.load(v_ptr + e[:, None] * D + dc[None, :], mask=gm, other=0.0).to(tl.float32)
            sel = ck[None, :] == k
            d2 += tl.where(sel, tl.sum(dy * m2, axis=1)[:, None], 0.0)
            d1 += tl.where(sel, tl.sum(dy * vv, axis=1)[:, None], 0.0)
        em = emask[:, None] & dm[None, :]
        m2e = tl.load(m2_ptr + ce[:, None] * D + dc[None, :], mask=em, other=0.0)
        ve = tl.load(v_ptr + ce[:, None] * D + dc[None, :], mask=em, other=0.0).to(tl.float32)
        mm += tl.sum(m2e * m2e, axis=1)
        mv += tl.sum(m2e * ve, axis=1)
    mn2_E = tl.sqrt(mm)
    mn1_E = tl.sqrt(tl.maximum(mv, 0.0))
    if CEL:
        zm = rm[:, None] & emask[None, :]
        zl = tl.load(logits_ptr + rows[:, None] * E + ce[None, :], mask=zm, other=0.0)
        nz = tl.where(emask[None, :], -zl, float("-inf"))
        nz = nz - tl.max(nz, axis=1)[:, None]
        logq = nz - tl.log(tl.sum(tl.exp(nz), axis=1))[:, None]  # log softmax(-z)
        q = tl.exp(logq)
        g = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
        cel = tl.zeros([BLOCK_T], dtype=tl.float32)
        nconf = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k in tl.static_range(K):
        sel_k = ck[None, :] == k
        e = tl.sum(tl.where(sel_k, e_TK, 0), axis=1)
        w = tl.load(w_ptr + rows * K + k, mask=rm, other=0.0)
        a = tl.load(pos_ptr + rows * K + k, mask=rm, other=0)
        sel = ce[None, :] == e[:, None]
        dot2 = w * tl.sum(tl.where(sel_k, d2, 0.0), axis=1)
        dot1 = w * tl.sum(tl.where(sel_k, d1, 0.0), axis=1)
        sq2 = w * w * sq
        sq1 = tl.load(sq1_ptr + a, mask=rm, other=0.0)
        m1 = tl.sum(tl.where(sel, mn1_E[None, :], 0.0), axis=1)
        m2n = tl.sum(tl.where(sel, mn2_E[None, :], 0.0), axis=1)
        n1 = tl.sqrt(sq1)
        n2 = tl.sqrt(sq2)
        considered = rm & (n1 > zero_norm) & (n2 > zero_norm) & (m1 > zero_norm) & (m2n > zero_norm)
        if HAS_VALID:
            considered = considered & (tl.load(valid_ptr + rows * K + k, mask=rm, other=0) != 0)
        cos1 = dot1 / tl.maximum(n1 * m1, zero_norm)
        cos2 = dot2 / tl.maximum(n2 * m2n, zero_norm)
        if SCORE == 0:
            s = (cos1 + cos2) / 2
        elif SCORE == 1:
            s = cos1
        elif SCORE == 2:
            s = cos2
        else:
            s = (dot1 + dot2) / tl.maximum(tl.sqrt((sq1 + sq2) * (m1 * m1 + m2n * m2n)), zero_norm)
        s = tl.minimum(tl.maximum(s, -1.0), 1.0)
        conflict = considered & (s < tau)
        tl.store(score_ptr + a, s, mask=rm)
        tl.store(cons_ptr + a, considered.to(tl.int8), mask=rm)
        tl.store(conf_ptr + a, conflict.to(tl.int8), mask=rm)
        if CEL:
            # per conflicting pair: d/dz of -log softmax(-z)_e = onehot_e - softmax(-z) (then scaled by 1/|C|)
            cf = conflict.to(tl.float32)
            g += cf[:, None] * (sel.to(tl.float32) - q)
            cel += cf * -tl.sum(tl.where(sel, logq, 0.0), axis=1)
            nconf += cf
    if CEL:
        tl.store(gz_ptr + rows[:, None] * E + ce[None, :], g, mask=rm[:, None] & emask[None, :])
        tl.store(part_ptr + pid * 2, tl.sum(nconf, axis=0))
        tl.store(part_ptr + pid * 2 + 1, tl.sum(cel, axis=0))


@triton.jit
def _cel_scale_kernel(gz_ptr, part_ptr, cel_ptr, n, nprog, scale, NP_PAD: tl.constexpr, BLOCK: tl.constexpr):
    pr = tl.arange(0, NP_PAD)
    nconf = tl.maximum(tl.sum(tl.load(part_ptr + pr * 2, mask=pr < nprog, other=0.0), axis=0), 1.0)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(gz_ptr + offs, tl.load(gz_ptr + offs, mask=m, other=0.0) * (scale / nconf), mask=m)
    if tl.program_id(0) == 0:
        tl.store(cel_ptr, tl.sum(tl.load(part_ptr + pr * 2 + 1, mask=pr < nprog, other=0.0), axis=0) / nconf)


def conflict_tokens(
    dy_TD: Tensor,
    m2_ED: Tensor,
    v_ED: Tensor,
    sq1_A: Tensor,
    topk_TK: Tensor,
    weights_TK: Tensor,
    pos_TK: Tensor,
    valid_TK: Tensor | None,
    logits_TE: Tensor,
    *,
    tau: float,
    zero_norm: float,
    score: str,
    cel_scale: float | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """STGC's SwiGLU-shortcut scores (``stgc.conflict.conflict_scores``) of every assignment in one pass
    over dy. g2_a = w_a dy_t, so <g2_a, m2_e> = w_a <dy_t, m2_e>, <g1_a, m1_e> = w_a <dy_t, v_e> and
    |g2_a|^2 = w_a^2 |dy_t|^2, with m2_e the expert's mean g2 (any positive multiple: the scores are
    cosines), m1_e = W_out[e]^T m2_e, v_e = W_out[e] m1_e (so |m1_e|^2 = <m2_e, v_e>); |g1_a|^2 = ``sq1_A``.
    With ``cel_scale`` also the scaled neg_logit_ce gradient (T x E) and L_cel.
    Returns (score_A fp32, considered_A, conflict_A (bool, sorted rows), grad_TE or None, cel or None)."""
    T, D = dy_TD.shape
    E, K = m2_ED.shape[0], topk_TK.shape[1]
    A = T * K
    dev = dy_TD.device
    score_A = torch.empty(A, device=dev, dtype=torch.float32)
    cons = torch.empty(A, device=dev, dtype=torch.bool)  # (written as 0/1 bytes through a uint8 view)
    conf = torch.empty(A, device=dev, dtype=torch.bool)
    nprog = triton.cdiv(T, ROUTE_BLOCK_T)
    cel_on = cel_scale is not None
    gz = torch.empty(T, E, device=dev, dtype=torch.float32) if cel_on else score_A
    part = torch.empty(max(nprog, 1), 2, device=dev, dtype=torch.float32)
    cel = torch.empty((), device=dev, dtype=torch.float32) if cel_on else None
    if T:
        _conflict_kernel[(nprog,)](
            dy_TD.contiguous(), m2_ED.float().contiguous(), v_ED.contiguous(), sq1_A.float().contiguous(),
            topk_TK.contiguous(), weights_TK.contiguous(), pos_TK.contiguous(),
            valid_TK.contiguous().view(torch.uint8) if valid_TK is not None else topk_TK,
            logits_TE.detach().contiguous(), score_A, cons.view(torch.uint8), conf.view(torch.uint8), gz,
            part, T, D, float(tau),
            float(zero_norm), E=E, E_PAD=_pad(E), K=K, K_PAD=_pad(K), SCORE=SCORE_CODES[score],
            HAS_VALID=valid_TK is not None, CEL=cel_on, BLOCK_T=ROUTE_BLOCK_T, BLOCK_D=64, num_warps=4,
        )  # fmt: skip
        if cel_on:
            n = T * E
            _cel_scale_kernel[(triton.cdiv(n, 1024),)](
                gz, part, cel, n, nprog, float(cel_scale), NP_PAD=_pad(nprog, 16), BLOCK=1024, num_warps=4
            )
    elif cel_on:
        gz.zero_()
        cel.zero_()
    return score_A, cons, conf, (gz if cel_on else None), cel
