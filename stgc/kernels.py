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
