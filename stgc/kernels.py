"""Hand-written Triton kernels for the MoE block's elementwise passes (CUDA only; imported lazily).

Why not ``torch.compile`` here: a compiled call costs ~0.1-0.2 ms of host time (guards, wrappers), which
the block pays several times per layer while the host, not the GPU, sets the pace (`stgc bench moe`);
and inductor does not fuse the per-row squared norm of SwiGLU's virtual-bias gradient into the activation
backward (an extra read of the A x F gradient). A Triton launch costs tens of microseconds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


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


SCORE_CODES = {"mean": 0, "g1": 1, "g2": 2, "concat": 3}


@triton.jit
def _conflict_rows_kernel(
    g_ptr,
    m_ptr,
    v_ptr,
    expert_ptr,
    sq1_ptr,
    mn1_ptr,
    mn2_ptr,
    score_ptr,
    cons_ptr,
    D,
    zero_norm,
    SCORE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    e = tl.load(expert_ptr + row).to(tl.int64)
    acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
    acc_m = tl.zeros([BLOCK], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        msk = cols < D
        g = tl.load(g_ptr + row * D + cols, mask=msk, other=0.0).to(tl.float32)
        acc_sq += g * g
        acc_m += g * tl.load(m_ptr + e * D + cols, mask=msk, other=0.0)
        acc_v += g * tl.load(v_ptr + e * D + cols, mask=msk, other=0.0)
    sq2 = tl.sum(acc_sq, axis=0)
    dot2 = tl.sum(acc_m, axis=0)
    dot1 = tl.sum(acc_v, axis=0)
    sq1 = tl.load(sq1_ptr + row)
    m1 = tl.load(mn1_ptr + e)
    m2 = tl.load(mn2_ptr + e)
    n1 = tl.sqrt(sq1)
    n2 = tl.sqrt(sq2)
    considered = (n1 > zero_norm) & (n2 > zero_norm) & (m1 > zero_norm) & (m2 > zero_norm)
    cos1 = dot1 / tl.maximum(n1 * m1, zero_norm)
    cos2 = dot2 / tl.maximum(n2 * m2, zero_norm)
    if SCORE == 0:
        s = (cos1 + cos2) / 2
    elif SCORE == 1:
        s = cos1
    elif SCORE == 2:
        s = cos2
    else:
        s = (dot1 + dot2) / tl.maximum(tl.sqrt((sq1 + sq2) * (m1 * m1 + m2 * m2)), zero_norm)
    s = tl.minimum(tl.maximum(s, -1.0), 1.0)
    tl.store(score_ptr + row, s)
    tl.store(cons_ptr + row, considered.to(tl.int8))


def conflict_rows(
    g2_AD: Tensor,
    mean2_ED: Tensor,
    v_ED: Tensor,
    expert_A: Tensor,
    sq1_A: Tensor,
    mnorm1_E: Tensor,
    mnorm2_E: Tensor,
    zero_norm: float,
    score: str,
) -> tuple[Tensor, Tensor]:
    """STGC's scores in one pass over g2 (SwiGLU shortcut, ``stgc.conflict.conflict_scores``): per row
    |g2|^2, <g2, gbar2_e>, <g2, v_e> (= <g1, gbar1_e>) and the cosine tail.
    Returns (score fp32, considered bool)."""
    A, D = g2_AD.shape
    g2_AD = g2_AD.contiguous()
    score_A = torch.empty(A, device=g2_AD.device, dtype=torch.float32)
    cons_A = torch.empty(A, device=g2_AD.device, dtype=torch.int8)
    if A:
        _conflict_rows_kernel[(A,)](
            g2_AD,
            mean2_ED.float().contiguous(),
            v_ED.float().contiguous(),
            expert_A,
            sq1_A.float().contiguous(),
            mnorm1_E.float().contiguous(),
            mnorm2_E.float().contiguous(),
            score_A,
            cons_A,
            D,
            zero_norm,
            SCORE=SCORE_CODES[score],
            BLOCK=1024,
            num_warps=4,
        )
    return score_A, cons_A.bool()
