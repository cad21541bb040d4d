"""Dispatch: how a forward's (token, slot) assignments map to expert-sorted rows, and how the expert
products are issued over those rows (shape legend in ``stgc.moe.record``).

Every (token, slot) assignment is a row (dropped, padding and null ones too, with combine weight 0), sorted
by router column with a stable sort (token order inside an expert), so the row count T*K is known on the
host and nothing waits for the device. Rows of null experts (columns >= E) sort past the bank's experts:
the products never compute them (``DispatchPlan.skips_rows``).
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import Tensor

from stgc.moe.record import RoutingRecord


def sort_assignments(topk_idx_TK: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The expert sort of every (token, slot) assignment (stable: token order inside an expert).
    Returns expert_A, order_A (= token * K + slot), token_A, pos_TK (the row of each (token, slot))."""
    T, K = topk_idx_TK.shape
    expert_A, order_A = torch.sort(topk_idx_TK.reshape(-1), stable=True)
    pos = torch.empty_like(order_A).scatter_(0, order_A, torch.arange(T * K, device=order_A.device))
    return expert_A, order_A, order_A // K, pos.view(T, K)


def expert_segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, start, end) of each non-empty expert slice of an expert-sorted assignment list."""
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, start, start + n))
        start += n
    return out


def expert_membership(expert_A: Tensor, num_experts: int, weight_A: Tensor | None, dtype) -> Tensor:
    """onehot_EA (times ``weight_A``, e.g. a 0/1 validity mask) in ``dtype``: ``member_EA @ x_AX`` is the
    per-expert sum of x's rows (one skinny GEMM: one read of x for all experts, fp32 accumulation inside,
    no device sync, no per-expert copies), ``member_EA.sum(1)`` the per-expert counts (no atomics). Rows of
    columns >= ``num_experts`` (null experts) belong to no expert."""
    member_EA = torch.zeros(num_experts + 1, expert_A.shape[0], device=expert_A.device, dtype=dtype)
    index = expert_A.clamp_max(num_experts)[None]
    member_EA.scatter_(0, index, 1.0 if weight_A is None else weight_A[None].to(dtype))
    return member_EA[:num_experts]


def expert_sums(x_AX: Tensor, expert_A: Tensor, num_experts: int) -> Tensor:
    """Per-expert sums of the rows of ``x_AX`` (E x X, in x's dtype; see ``expert_membership``)."""
    return expert_membership(expert_A, num_experts, None, x_AX.dtype) @ x_AX


def grouped_rows_wt(a_AX: Tensor, w_EYX: Tensor, offsets_E: Tensor) -> Tensor:
    """out[rows of e] = a[rows of e] @ w[e]^T as one ``torch._grouped_mm`` (``offsets_E``: int32 inclusive
    end of each expert's rows, on the device; rows past the last offset are not computed)."""
    return torch._grouped_mm(a_AX, w_EYX.transpose(1, 2), offs=offsets_E)


# How the expert products are issued. ``grouped``: every product one ``torch._grouped_mm`` (device offsets:
# nothing waits for the routing). ``grouped_forward``: the forward's grouped, the backward's one cuBLAS
# product per expert on sizes the forward copies to the host. ``per_expert``: every product per expert,
# sized on the host (the forward waits for the routing: CPU, fp64, unaligned sizes). ``auto``: on CUDA bf16
# with aligned sizes ``grouped_forward`` from PER_EXPERT_BACKWARD_MIN_ROWS rows per expert on average
# (T*K >= E * that), ``grouped`` below; else ``per_expert``. Why (results/bench/README.md has the runs):
# under the H200's power cap the per-expert kernels of a whole step sum to less, so ``grouped_forward`` is
# 1-2% faster at 16384 tokens; but the backward's wait for the sizes keeps the host from running ahead,
# which at 8192 tokens made the step 0.5-2.6% slower.
EXPERT_PRODUCTS = ("auto", "grouped_forward", "grouped", "per_expert")
PER_EXPERT_BACKWARD_MIN_ROWS = int(os.environ.get("STGC_PER_EXPERT_BACKWARD_MIN_ROWS", 8192))


def use_grouped_mm(x: Tensor, dims: tuple[int, ...], mode: str = "auto") -> bool:
    """Whether the forward's expert products go through ``torch._grouped_mm`` (``EXPERT_PRODUCTS``): ``auto``
    on CUDA bf16 with 16-byte aligned rows; ``grouped`` / ``grouped_forward`` wherever torch has it for x's
    dtype (fp32 / bf16; CPU included, for tests), else per expert; ``per_expert``: never."""
    if mode not in EXPERT_PRODUCTS:
        raise ValueError(f"expert_products={mode!r} is not valid; choose one of {EXPERT_PRODUCTS}.")
    if mode == "per_expert" or not hasattr(torch, "_grouped_mm"):
        return False
    aligned = all(d % (16 // x.element_size()) == 0 for d in dims)
    if mode in ("grouped", "grouped_forward"):
        return aligned and x.dtype in (torch.float32, torch.bfloat16)
    return x.is_cuda and x.dtype == torch.bfloat16 and aligned


class ExpertGroups:
    """How expert-sorted rows split into experts, and the three per-expert products of an expert FFN.

    ``offsets_E``: device-side end offsets for ``torch._grouped_mm`` (one kernel per product for all
    experts, no host sync). ``segments``: host-side (expert, start, end) for one product per expert. With
    offsets alone every product is grouped. With ``per_expert_backward`` the forward's products are grouped
    and the backward's run per expert on sizes the forward copies to the host (``send_sizes``, issued after
    the forward's first product: by the backward the copy has long arrived and the wait costs nothing; see
    ``EXPERT_PRODUCTS``).
    """

    def __init__(
        self,
        offsets_E: Tensor | None,
        segments: list[tuple[int, int, int]] | None,
        num_experts: int,
        per_expert_backward: bool = False,
    ):
        self.offsets_E, self.segments, self.num_experts = offsets_E, segments, num_experts
        self.per_expert_backward = per_expert_backward and offsets_E is not None
        self._host_sizes: tuple[Tensor, torch.cuda.Event | None] | None = None

    @classmethod
    def for_rows(
        cls, num_rows: int, offsets_E: Tensor, num_experts: int, mode: str, grouped: bool
    ) -> ExpertGroups:
        """The groups of ``num_rows`` rows ending at ``offsets_E``: device offsets when ``grouped`` (with the
        backward's products per expert from PER_EXPERT_BACKWARD_MIN_ROWS rows per expert on average under
        ``auto``), else host segments (a device sync: CPU and unusual shapes only)."""
        if grouped:
            split = mode == "grouped_forward" or (
                mode == "auto" and num_rows >= num_experts * PER_EXPERT_BACKWARD_MIN_ROWS
            )
            split = split and torch.is_grad_enabled()  # (no backward will come: no sizes to copy)
            return cls(offsets_E.to(torch.int32), None, num_experts, per_expert_backward=split)
        counts = torch.diff(offsets_E.long(), prepend=offsets_E.new_zeros(1).long())
        return cls(None, expert_segments(counts.tolist()), num_experts)

    def send_sizes(self) -> None:
        """Start copying the offsets to the host (asynchronous on CUDA) for a per-expert backward."""
        if self.per_expert_backward and self._host_sizes is None:
            cuda = self.offsets_E.is_cuda
            host = torch.empty(self.num_experts, dtype=torch.int32, pin_memory=cuda)
            host.copy_(self.offsets_E, non_blocking=cuda)
            ready = None
            if cuda:  # (on the offsets' device's stream, which need not be the current device's)
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(self.offsets_E.device))
            self._host_sizes = (host, ready)

    def _per_expert(self) -> bool:
        """Whether the backward's products run per expert (building the segments on first use)."""
        if self.segments is None and self.per_expert_backward:
            self.send_sizes()
            host, ready = self._host_sizes
            if ready is not None:
                ready.synchronize()
            ends = host.tolist()
            self.segments = expert_segments([b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)])
        return self.segments is not None

    def rows_wt(self, a_AX: Tensor, w_EYX: Tensor) -> Tensor:
        """out[rows of e] = a[rows of e] @ w[e]^T (the forward of a linear layer)."""
        if self.offsets_E is not None:
            return grouped_rows_wt(a_AX, w_EYX, self.offsets_E)
        out = a_AX.new_empty(a_AX.shape[0], w_EYX.shape[1])
        for e, s, t in self.segments:
            torch.mm(a_AX[s:t], w_EYX[e].t(), out=out[s:t])
        return out

    def rows_w(self, g_AY: Tensor, w_EYX: Tensor) -> Tensor:
        """out[rows of e] = g[rows of e] @ w[e] (a linear layer's input gradient)."""
        if not self._per_expert():
            return torch._grouped_mm(g_AY, w_EYX, offs=self.offsets_E)
        out = g_AY.new_empty(g_AY.shape[0], w_EYX.shape[2])
        for e, s, t in self.segments:
            torch.mm(g_AY[s:t], w_EYX[e], out=out[s:t])
        return out

    def weight_grad(self, g_AY: Tensor, a_AX: Tensor) -> Tensor:
        """out[e] = g[rows of e]^T @ a[rows of e] (a linear layer's weight gradient); 0 for empty experts."""
        if not self._per_expert():
            return torch._grouped_mm(g_AY.t(), a_AX, offs=self.offsets_E)
        out = g_AY.new_empty(self.num_experts, g_AY.shape[1], a_AX.shape[1])
        done = set()
        for e, s, t in self.segments:
            torch.mm(g_AY[s:t].t(), a_AX[s:t], out=out[e])
            done.add(e)
        for e in set(range(self.num_experts)) - done:  # (zero-filling only the empty ones: the bank is large)
            out[e].zero_()
        return out


@dataclasses.dataclass
class DispatchPlan:
    """How one forward's (token, slot) assignments map to expert-sorted rows (A = T*K rows).

    token_A / expert_A / order_A (= token * K + slot): per sorted row. pos_TK: the sorted row of each
    (token, slot). groups: the per-expert split of the rows and the products over them. valid_TK: (token,
    slot) validity (executed, real token) where an observer needs it, else ``None``. skips_rows: rows past
    the bank's last expert (null experts) exist and are never computed: their outputs are zeroed.
    triton_passes: the expert path's elementwise passes (and the observer's scores) run as Triton kernels.
    inputs_AD / weights_A: the gathered inputs and combine weights when the routing kernel already produced
    them (else the expert path gathers them). first_product_AH: x_AD W_in^T when the routing already
    issued it (the fused routing); the expert path takes it over (and sets the field to ``None``: the GELU
    bias is added to it in place).
    """

    token_A: Tensor
    expert_A: Tensor
    order_A: Tensor
    pos_TK: Tensor
    groups: ExpertGroups
    triton_passes: bool
    valid_TK: Tensor | None = None
    skips_rows: bool = False
    inputs_AD: Tensor | None = None
    weights_A: Tensor | None = None
    first_product_AH: Tensor | None = None


def valid_assignments(record: RoutingRecord, observed: bool, masked: bool, dropping: bool) -> Tensor | None:
    """(token, slot) validity for an observer: ``None`` when nobody observes or every assignment is valid
    (no padding mask, no dropped or null assignment), so that the host knows it without a sync."""
    if not observed or not (dropping or masked):
        return None
    return record.executed_TK().contiguous()
