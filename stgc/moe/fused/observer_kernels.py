"""STGC's conflict scores and CEL gradient in one Triton pass over dy, token by token (the fused
observer; docs/method.md, "Three ways to compute it"). Shape legend as in ``stgc.moe.record``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from stgc.moe.fused import launch
from stgc.moe.fused.launch import pad

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
    nprog = triton.cdiv(T, launch.ROUTE_BLOCK_T)
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
            float(zero_norm), E=E, E_PAD=pad(E), K=K, K_PAD=pad(K), SCORE=SCORE_CODES[score],
            HAS_VALID=valid_TK is not None, CEL=cel_on, BLOCK_T=launch.ROUTE_BLOCK_T, BLOCK_D=64, num_warps=4,
        )  # fmt: skip
        if cel_on:
            n = T * E
            _cel_scale_kernel[(triton.cdiv(n, 1024),)](
                gz, part, cel, n, nprog, float(cel_scale), NP_PAD=pad(nprog, 16), BLOCK=1024, num_warps=4
            )
    elif cel_on:
        gz.zero_()
        cel.zero_()
    return score_A, cons, conf, (gz if cel_on else None), cel
