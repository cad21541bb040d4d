"""Launch shapes of the fused path's memory-bound Triton kernels (tokens / rows and columns per program,
warps). Picked on the H200 with ``stgc/bench/kernel_tuning.py``; module attributes, read at each launch, so
that the tuning sweep (and the tests) can set them. The score kernel's and the SwiGLU passes' shapes are
set where they are launched."""

from __future__ import annotations

import triton

ROUTE_BLOCK_T = 32  # tokens per program of the forward routing kernels (and of the token-wise score kernel)
ROUTE_BLOCK_D = 128  # columns per step of the router kernel's product
ROUTE_WARPS = 8
GATHER_BLOCK_D = 256  # columns per program of the dispatch's token gather
ROUTE_BWD_BLOCK_T, ROUTE_BWD_BLOCK_D, ROUTE_BWD_WARPS = 64, 128, 2  # the routing's backward (2-D grid)
ROW_BLOCK = 64  # assignment rows per program of the row kernels
ROWDOT_BLOCK_D, ROWDOT_WARPS = 128, 4
COMBINE_BLOCK_T, COMBINE_BLOCK_D, COMBINE_WARPS = 16, 128, 8


def pad(n: int, least: int = 2) -> int:
    """The power of two >= max(n, least) (``tl.arange`` sizes)."""
    return max(least, triton.next_power_of_2(n))
