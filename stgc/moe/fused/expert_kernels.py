"""The fused expert path's elementwise passes as Triton kernels: SwiGLU forward and backward, the
weighted combine of expert outputs into tokens, and the backward's row pass (combine-weight gradients,
g2 = w dy, and the per-expert sums of g2 the fused observer scores from). Each replaces several eager
passes over a large tensor with one. Shape legend as in ``stgc.moe.record``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from stgc.moe.fused import launch
from stgc.moe.fused.launch import pad


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
        grid = (triton.cdiv(T, launch.COMBINE_BLOCK_T), triton.cdiv(D, launch.COMBINE_BLOCK_D))
        w = w_TK.contiguous() if w_TK is not None else o_AD
        _combine_kernel[grid](o_AD, pos_TK.contiguous(), w, y, T, D, K=K, HAS_W=w_TK is not None,
                              BLOCK_T=launch.COMBINE_BLOCK_T, BLOCK_D=launch.COMBINE_BLOCK_D,
                              num_warps=launch.COMBINE_WARPS)  # fmt: skip
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
    nprog = triton.cdiv(A, launch.ROW_BLOCK)
    part = torch.empty(max(nprog, 1), num_experts, D, device=dev, dtype=torch.float32) if stats else gw
    has_valid = valid_TK is not None
    if A:
        _rowdot_kernel[(nprog,)](
            dy_TD.contiguous(), o_AD.contiguous(), token_A, w_A.contiguous(),
            expert_A if stats else token_A, order_A if has_valid else token_A,
            valid_TK.reshape(-1).view(torch.uint8) if has_valid else token_A, gw, g2, part, A, D,
            E=max(num_experts, 1), E_DOT=pad(num_experts, 16), STATS=stats, HAS_VALID=has_valid,
            IEEE=dy_TD.dtype == torch.float32,
            BLOCK_R=launch.ROW_BLOCK, BLOCK_D=launch.ROWDOT_BLOCK_D, num_warps=launch.ROWDOT_WARPS,
        )  # fmt: skip
    elif stats:
        part.zero_()
    return gw, g2, (part.sum(0) if stats else None)
