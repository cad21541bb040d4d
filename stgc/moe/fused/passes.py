"""The fused expert path's elementwise passes in plain torch (CPU, fp64, or without Triton), compiled with
``torch.compile`` where a pass reads a large CUDA tensor, and the switch that picks the Triton kernels
(``stgc.moe.fused.expert_kernels``) instead. Shape legend as in ``stgc.moe.record``."""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def act_backward(ffn: str, h: Tensor, grad_a: Tensor, F_: int, with_sq: bool = False):
    """d(activation)/dh applied to grad_a, computed in at least fp32 and returned in h's dtype; with
    ``with_sq`` (SwiGLU) also |grad_a|^2 per row in fp32: the norm of the virtual first-bias gradient g1,
    read in the same pass (the conflict scores' SwiGLU shortcut then never reads g1).

    Written as plain elementwise code so that ``torch.compile`` fuses it into one kernel on GPU (no
    full-size fp32 temporaries: the upcast happens per element inside the kernel)."""
    ct = torch.promote_types(h.dtype, torch.float32)
    ga = grad_a.to(ct)
    if ffn == "swiglu":
        gate, up = h[:, :F_].to(ct), h[:, F_:].to(ct)
        sig = torch.sigmoid(gate)
        d_gate = ga * up * sig * (1 + gate * (1 - sig))
        d_up = ga * gate * sig
        grad_h = torch.cat([d_gate, d_up], dim=1).to(h.dtype)
        return (grad_h, (ga * ga).sum(-1)) if with_sq else grad_h
    x = h.to(ct)
    th = torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
    d = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
    return (ga * d).to(h.dtype)


def rowdot_scale(dy_TD: Tensor, token_A: Tensor, o_AD: Tensor, w_A: Tensor) -> tuple[Tensor, Tensor]:
    """(<dy_t, o_A> in fp32, g2_A = w_A * dy_t) for t = token_A: the combine weights' gradient and the
    output-bias gradient, in one pass that reads dy by index (compiled on GPU: no gathered copy of dy). A
    dropped assignment (weight 0) gets no weight gradient, as if it had not been computed."""
    ct = torch.promote_types(dy_TD.dtype, torch.float32)
    dy_AD = dy_TD[token_A].to(ct)
    grad_w_A = torch.where(w_A != 0, (dy_AD * o_AD.to(ct)).sum(-1), 0.0)
    g2_AD = (dy_AD * w_A[:, None].to(ct)).to(dy_TD.dtype)
    return grad_w_A, g2_AD


def combine(o_AD: Tensor, pos_TK: Tensor, w_TK: Tensor | None) -> Tensor:
    """y_t = sum_k w_tk * o[pos_tk] (fp32 accumulation). A gather instead of an atomic scatter-add: faster,
    and deterministic for any K."""
    ct = torch.promote_types(o_AD.dtype, torch.float32)
    g = o_AD[pos_TK].to(ct)
    if w_TK is not None:
        g = g * w_TK[..., None].to(ct)
    return g.sum(1).to(o_AD.dtype)


_COMPILED: dict[str, object] = {}


# Compiling pays where an elementwise pass over a large tensor is memory-bound (one fused kernel instead of
# several passes); on small tensors the compiled call's dispatch costs more than it saves. Measured on one
# H100 (`stgc bench stgc`): the `small` model's full step took 87 ms with every helper compiled and 67 ms
# eager, while at StableLM-1.6B's MoE shape the compiled activation backward alone saves ~0.7 ms per layer.
COMPILE_MIN_NUMEL = int(os.environ.get("STGC_COMPILE_MIN_NUMEL", 2**25))


def _generated(big: Tensor) -> bool:
    """Whether a pass reading ``big`` gets a ``torch.compile``d kernel (the non-Triton path): ``big`` is a
    CUDA tensor of at least COMPILE_MIN_NUMEL elements and STGC_NO_COMPILE=1 is not set."""
    return big.is_cuda and big.numel() >= COMPILE_MIN_NUMEL and os.environ.get("STGC_NO_COMPILE") != "1"


# Tests set this to run the Triton kernels on CPU tensors (with TRITON_INTERPRET=1, Triton's interpreter).
TRITON_ON_CPU = False


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_ok(t: Tensor) -> bool:
    """Whether the Triton kernels (Triton) runs the passes over ``t``: a CUDA tensor (or ``TRITON_ON_CPU``)
    that is not fp64, Triton importable and STGC_NO_TRITON=1 not set (else the compiled or eager code).
    No size threshold: one launch (20-40 us of host time on the H200 machines, `profile_steps.py`) replaces
    several eager ops (7-8 us each) or a compiled call (29-49 us)."""
    return (
        (t.is_cuda or TRITON_ON_CPU)
        and t.dtype != torch.float64
        and os.environ.get("STGC_NO_TRITON") != "1"
        and _triton_importable()
    )


def maybe_compiled(name: str, fn, big: Tensor):
    """``fn`` compiled with torch.compile when ``_generated(big)`` (``big``: the largest tensor it reads);
    eager otherwise."""
    if not _generated(big):
        return fn
    if name not in _COMPILED:
        # dynamic=None: token counts vary between calls, feature sizes stay static (aligned, vectorised)
        _COMPILED[name] = torch.compile(fn)
    return _COMPILED[name]
