"""The MoE block: router, expert bank, and the routing record (STGC.md section 1, STYLE.md 1-2).

Shape legend: B batch, T tokens (flattened batch x sequence), D model dim, F expert FFN dim, H expert input
projection width (2F for SwiGLU: gate and up in one matrix; F for GELU), E experts, K top-k,
A (token, slot) assignment rows: all T*K of them in the expert path (a dropped or padding assignment is a
row with combine weight 0, so that the row count is known on the host and nothing waits for the device).

Routing leaves the block in one way only: a ``RoutingRecord`` appended to the active ``RoutingContext``
(set by the model around a forward; see ``routing_context``). Layers keep their signatures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stgc.config import MoEConfig

FFN_KINDS = ("swiglu", "gelu")


@dataclasses.dataclass
class RoutingRecord:
    """What one MoE layer decided in one forward. Tensors are over the T = B*S flattened tokens.

    logits_TE: router logits, fp32, carrying gradient in training (the regularisers are functions of it).
    probs_TE: softmax(logits_TE), fp32.
    topk_idx_TK: chosen experts per token, ordered by probability (descending).
    weights_TK: combine weights renormalised over the chosen experts; 0 where an assignment was dropped.
    token_mask_T: True for real tokens, False for padding (padding is routed but never counted).
    kept_TK: False where the capacity limit dropped an assignment (all True without a capacity factor).
    tokens_per_expert_E: kept assignments per expert over real tokens (all K slots).
    aux_loss: the layer's unscaled load-balancing loss E * sum_e f_e P_e over real tokens.
    """

    layer_idx: int
    logits_TE: Tensor
    probs_TE: Tensor
    topk_idx_TK: Tensor
    weights_TK: Tensor
    token_mask_T: Tensor
    kept_TK: Tensor
    tokens_per_expert_E: Tensor
    aux_loss: Tensor

    @property
    def num_experts(self) -> int:
        return self.logits_TE.shape[-1]

    @property
    def top_k(self) -> int:
        return self.topk_idx_TK.shape[-1]


@dataclasses.dataclass
class TokenGrads:
    """The token-level bias gradients of one MoE layer (STGC.md section 2), handed to a ``GradObserver``
    inside the layer's backward. Rows are all T*K (token, slot) assignments in expert-sorted order; dropped
    and padding assignments are rows too (their gradients are zero) and ``rows_valid()`` marks them False.

    g1_AF: gradient at the first bias: dL/da at the down projection's input (SwiGLU's virtual bias) or
        dL/dh at fc1's bias (GELU). g2_AD: gradient at the output bias, w_A * dL/dy_t.
    expert_A / token_A / order_A (= token * K + slot): expert, token and assignment of each row;
        pos_TK: the row of each (token, slot).
    valid_TK: (token, slot) validity (not padding, not dropped), ``None`` when every assignment is valid
        (known on the host without a device sync).
    sq1_A: |g1_a|^2 in fp32 (SwiGLU), computed in the pass that produced g1 (or ``None``).
    w_out_EDF: SwiGLU only: the down projections. There g1 = g2 @ W_out[e] exactly, so per-expert sums of
        g1 and dot products with g1 can be taken from g2 and W_out without another pass over g1.
    dy_TD / sums2_ED: the Triton path's extras (SwiGLU): g2_a = w_a dy[token_a] with w the record's combine
        weights, and the fp32 sums of g2 over each expert's valid rows, so that an observer can score every
        assignment from one read of dy (``stgc.kernels.conflict_tokens``).
    """

    g1_AF: Tensor
    g2_AD: Tensor
    expert_A: Tensor
    token_A: Tensor
    order_A: Tensor
    pos_TK: Tensor
    valid_TK: Tensor | None = None
    sq1_A: Tensor | None = None
    w_out_EDF: Tensor | None = None
    dy_TD: Tensor | None = None
    sums2_ED: Tensor | None = None

    def rows_valid(self) -> Tensor | None:
        """Validity of each row (``None``: all valid)."""
        return None if self.valid_TK is None else self.valid_TK.reshape(-1).index_select(0, self.order_A)


class GradObserver(Protocol):
    """Called inside each MoE layer's backward with the layer's ``RoutingRecord`` and ``TokenGrads``
    (STGC.md section 2). Returns an extra gradient for the router logits (T, E) to add to the ordinary one
    (the fused conflict elimination loss), or ``None``. An observer with ``active = False`` is skipped."""

    def __call__(self, record: RoutingRecord, grads: TokenGrads) -> Tensor | None: ...


@dataclasses.dataclass(frozen=True)
class FirstPass:
    """What two_pass's first backward needs of each MoE layer (``stgc.conflict.two_pass_first_pass``), set
    as ``observer.first_pass`` for that backward: token gradients and input gradients, no weight gradients;
    no input gradient in ``stop_layer`` (nothing below its router needs one); ``keep_layer`` (or ``None``)
    runs its whole backward and keeps it for the second backward, whose upstream gradient there is the
    same (``_ExpertsFn.backward``)."""

    stop_layer: int
    keep_layer: int | None


@dataclasses.dataclass
class RoutingContext:
    """Per-forward routing state shared by every MoE block of a model.

    token_mask_BT: real-token mask for the tokens of this forward (B, S) or ``None`` (all real).
    records: when a list, each block appends its ``RoutingRecord`` (in layer order of execution).
    observer: a ``GradObserver`` called inside each block's backward; ``None`` means no token gradients.
    modality_BT: optional int codes per token (used by analysis and modality-aware methods).
    injected_biases: {layer_idx: (bias1_TKF, bias2_TKD)} explicit per-(token, slot) zero biases whose
        gradients are the token-level bias gradients (the `reference` STGC mode); the layers named run the
        plain-autograd expert path.
    """

    token_mask_BT: Tensor | None = None
    records: list[RoutingRecord] | None = None
    observer: GradObserver | None = None
    modality_BT: Tensor | None = None
    injected_biases: dict[int, tuple[Tensor, Tensor]] | None = None


@contextlib.contextmanager
def routing_context(model: nn.Module, ctx: RoutingContext) -> Iterator[RoutingContext]:
    """Attach ``ctx`` to every ``MoEBlock`` of ``model`` for the duration of a forward (and its backward:
    the observer and records are captured by the autograd graph, so the context may be left before
    ``loss.backward()``)."""
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    previous = [b.routing_ctx for b in blocks]
    for b in blocks:
        b.routing_ctx = ctx
    try:
        yield ctx
    finally:
        for b, p in zip(blocks, previous, strict=True):
            b.routing_ctx = p


# --------------------------------------------------------------------------------------------------------
# routing


def route(
    logits_TE: Tensor,
    config: MoEConfig,
    token_mask_T: Tensor,
    *,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Top-k routing with renormalised combine weights, DeepSpeed's load-balancing loss and optional capacity.

    Returns probs_TE, topk_idx_TK, weights_TK, kept_TK, tokens_per_expert_E, aux_loss.
    L_aux = E * sum_e f_e * P_e, f_e = share of real tokens whose top-1 expert is e (before dropping, as
    DeepSpeed computes it), P_e = mean router probability of e over real tokens. With ``route_padding``
    every token counts, which reproduces MoE-LLaVA exactly.
    """
    E, K = config.num_experts, config.top_k
    probs_TE = logits_TE.softmax(dim=-1)
    count_mask_T = torch.ones_like(token_mask_T) if config.route_padding else token_mask_T
    sample = config.second_expert_sampling and (training or config.sample_at_eval)
    if sample:
        # DeepSpeed: the 2nd expert is argmax(logits + Gumbel noise) excluding the 1st.
        top1_T = probs_TE.argmax(dim=-1)
        # Gumbel(0, 1) drawn as DeepSpeed's gumbel_rsample draws it (torch Gumbel: u ~ U[tiny, 1 - eps),
        # -log(-log(u))), so that a shared seed reproduces DeepSpeed's choices (tests/test_moe.py).
        fi = torch.finfo(logits_TE.dtype)
        u_TE = torch.rand_like(logits_TE) * (1 - fi.eps - fi.tiny) + fi.tiny
        gumbel_TE = -torch.log(-torch.log(u_TE))
        noisy_TE = (logits_TE.detach() + gumbel_TE).scatter(1, top1_T[:, None], float("-inf"))
        topk_idx_TK = torch.stack([top1_T, noisy_TE.argmax(dim=-1)], dim=-1)
    else:
        # ties go to the lower expert index (DeepSpeed's argmax and the Triton routing do the same;
        # torch.topk leaves the order of equal values unspecified)
        topk_idx_TK = torch.sort(probs_TE, dim=-1, descending=True, stable=True).indices[:, :K].contiguous()
    top1_T = topk_idx_TK[:, 0]

    n_real = count_mask_T.sum().clamp_min(1).to(probs_TE.dtype)
    m = count_mask_T.to(probs_TE.dtype)
    f_E = torch.zeros(E, device=logits_TE.device, dtype=probs_TE.dtype).index_add_(0, top1_T, m) / n_real
    P_E = (probs_TE * m[:, None]).sum(0) / n_real
    aux_loss = E * (f_E * P_E).sum()

    kept_TK = torch.ones_like(topk_idx_TK, dtype=torch.bool)
    if config.capacity_factor is not None:
        kept_TK = _capacity_keep(topk_idx_TK, count_mask_T, config)
    kept_TK = kept_TK & token_mask_T[:, None] if not config.route_padding else kept_TK

    gathered_TK = probs_TE.gather(1, topk_idx_TK) * kept_TK
    # DeepSpeed clamps the denominator at fp32 eps: a token with every assignment dropped gets weight 0.
    weights_TK = gathered_TK / gathered_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(probs_TE.dtype).eps)
    counted_TK = kept_TK & token_mask_T[:, None]
    tokens_per_expert_E = torch.zeros(E, device=logits_TE.device, dtype=torch.long).index_add_(
        0, topk_idx_TK.reshape(-1), counted_TK.reshape(-1).long()
    )  # (no boolean indexing: it would force a host sync every layer)
    return probs_TE, topk_idx_TK, weights_TK, kept_TK, tokens_per_expert_E, aux_loss


def _capacity_keep(topk_idx_TK: Tensor, count_mask_T: Tensor, config: MoEConfig) -> Tensor:
    """DeepSpeed's capacity: C = max(ceil(cf * K * T / E), min_capacity); positions are given to all top-1
    assignments in token order, then to the top-2 ones, ...; assignments at position >= C are dropped.
    Tokens outside ``count_mask_T`` take no position (MoE-LLaVA counts padding: ``route_padding``)."""
    T, K = topk_idx_TK.shape
    E = config.num_experts
    # computed on the device (a host int would sync every layer); fp64 so that ceil matches Python's
    n = count_mask_T.sum().to(torch.float64)
    capacity = torch.ceil(config.capacity_factor * K * n / E).clamp_min(config.min_capacity)
    keep_TK = torch.zeros_like(topk_idx_TK, dtype=torch.bool)
    offset_E = torch.zeros(E, dtype=torch.long, device=topk_idx_TK.device)
    for k in range(K):
        onehot_TE = F.one_hot(topk_idx_TK[:, k], E) * count_mask_T[:, None]
        pos_TE = onehot_TE.cumsum(0) - 1 + offset_E
        pos_T = (pos_TE * onehot_TE).sum(-1)
        keep_TK[:, k] = (pos_T < capacity) & count_mask_T
        offset_E = offset_E + onehot_TE.sum(0)
    return keep_TK


# --------------------------------------------------------------------------------------------------------
# experts


class ExpertBank(nn.Module):
    """E FFN experts stored as stacked weights (one matrix product per expert on its sorted tokens).

    swiglu (Llama, Qwen2, StableLM; no biases): w_in_EHD = [gate; up] (H = 2F), w_out_EDF.
        y = W_out (silu(W_gate x) * (W_up x)); the first bias is virtual, at the input of W_out.
    gelu (Phi-2; biases): w_in_EHD (H = F), b_in_EH, w_out_EDF, b_out_ED.
        y = W_out gelu_tanh(W_in x + b_in) + b_out; the first bias is b_in (pre-activation).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, ffn: str):
        super().__init__()
        if ffn not in FFN_KINDS:
            raise ValueError(f"ffn={ffn!r} is not supported; valid kinds are {FFN_KINDS}.")
        self.ffn, self.num_experts = ffn, num_experts
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        H = 2 * intermediate_size if ffn == "swiglu" else intermediate_size
        self.w_in = nn.Parameter(torch.empty(num_experts, H, hidden_size))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        if ffn == "gelu":
            self.b_in = nn.Parameter(torch.zeros(num_experts, intermediate_size))
            self.b_out = nn.Parameter(torch.zeros(num_experts, hidden_size))
        else:
            self.register_parameter("b_in", None)
            self.register_parameter("b_out", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w_in, self.w_out):
            nn.init.kaiming_uniform_(w.view(-1, w.shape[-1]), a=math.sqrt(5))
        if self.b_in is not None:
            nn.init.zeros_(self.b_in)
            nn.init.zeros_(self.b_out)

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, D={self.hidden_size}, F={self.intermediate_size}, ffn={self.ffn}"


def sort_assignments(topk_idx_TK: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The eager expert sort: every (token, slot) assignment is a row, sorted by expert (stable: token order
    inside an expert); dropped and padding ones ride along (with combine weight 0 in the block, as a dense
    FFN computes padding), so the row count is T*K on the host and nothing waits for the device.
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
    no device sync, no per-expert copies), ``member_EA.sum(1)`` the per-expert counts (no atomics)."""
    member_EA = torch.zeros(num_experts, expert_A.shape[0], device=expert_A.device, dtype=dtype)
    return member_EA.scatter_(0, expert_A[None], 1.0 if weight_A is None else weight_A[None].to(dtype))


def expert_sums(x_AX: Tensor, expert_A: Tensor, num_experts: int) -> Tensor:
    """Per-expert sums of the rows of ``x_AX`` (E x X, in x's dtype; see ``expert_membership``)."""
    return expert_membership(expert_A, num_experts, None, x_AX.dtype) @ x_AX


def grouped_rows_wt(a_AX: Tensor, w_EYX: Tensor, offsets_E: Tensor) -> Tensor:
    """out[rows of e] = a[rows of e] @ w[e]^T as one ``torch._grouped_mm`` (``offsets_E``: int32 inclusive
    end of each expert's rows, on the device)."""
    return torch._grouped_mm(a_AX, w_EYX.transpose(1, 2), offs=offsets_E)


class _Groups:
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
        E: int,
        per_expert_backward: bool = False,
    ):
        self.offsets_E, self.segments, self.E = offsets_E, segments, E
        self.per_expert_backward = per_expert_backward and offsets_E is not None
        self._host: tuple[Tensor, torch.cuda.Event | None] | None = None

    def send_sizes(self) -> None:
        """Start copying the offsets to the host (asynchronous on CUDA) for a per-expert backward."""
        if self.per_expert_backward and self._host is None:
            cuda = self.offsets_E.is_cuda
            host = torch.empty(self.E, dtype=torch.int32, pin_memory=cuda)
            host.copy_(self.offsets_E, non_blocking=cuda)
            ready = None
            if cuda:  # (on the offsets' device's stream, which need not be the current device's)
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(self.offsets_E.device))
            self._host = (host, ready)

    def _per_expert(self) -> bool:
        """Whether the backward's products run per expert (building the segments on first use)."""
        if self.segments is None and self.per_expert_backward:
            self.send_sizes()
            host, ready = self._host
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
        out = g_AY.new_empty(self.E, g_AY.shape[1], a_AX.shape[1])
        done = set()
        for e, s, t in self.segments:
            torch.mm(g_AY[s:t].t(), a_AX[s:t], out=out[e])
            done.add(e)
        for e in set(range(self.E)) - done:  # (zero-filling only the empty ones: the bank is large)
            out[e].zero_()
        return out


# How the expert products are issued. ``grouped``: every product one ``torch._grouped_mm`` (device offsets:
# nothing waits for the routing). ``grouped_forward``: the forward's grouped, the backward's one cuBLAS
# product per expert on sizes the forward copies to the host. ``per_expert``: every product per expert,
# sized on the host (the forward waits for the routing: CPU, fp64, unaligned sizes). ``auto``: on CUDA bf16
# with aligned sizes ``grouped_forward`` from PER_EXPERT_BACKWARD_MIN_ROWS rows per expert on average
# (T*K >= E * that), ``grouped`` below; else ``per_expert``. Measured on the H200
# (``results/bench/README.md``): the per-expert kernels of a whole step sum to less under the GPU's power
# cap, so ``grouped_forward`` is 1-2% faster at 16384 tokens
# (8192 rows per expert); but the backward's wait for the sizes keeps the host from running further ahead
# than the forward's products, which at 8192 tokens made the step 0.5-2.6% slower (2.4-6% pipelined).
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


def _act_forward(ffn: str, h: Tensor, F_: int) -> Tensor:
    if ffn == "swiglu":
        return F.silu(h[:, :F_]) * h[:, F_:]
    return F.gelu(h, approximate="tanh")


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _act_backward(ffn: str, h: Tensor, grad_a: Tensor, F_: int, with_sq: bool = False):
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


def _rowdot_scale(dy_TD: Tensor, token_A: Tensor, o_AD: Tensor, w_A: Tensor) -> tuple[Tensor, Tensor]:
    """(<dy_t, o_A> in fp32, g2_A = w_A * dy_t) for t = token_A: the combine weights' gradient and the
    output-bias gradient, in one pass that reads dy by index (compiled on GPU: no gathered copy of dy). A
    dropped assignment (weight 0) gets no weight gradient, as if it had not been computed."""
    ct = torch.promote_types(dy_TD.dtype, torch.float32)
    dy_AD = dy_TD[token_A].to(ct)
    grad_w_A = torch.where(w_A != 0, (dy_AD * o_AD.to(ct)).sum(-1), 0.0)
    g2_AD = (dy_AD * w_A[:, None].to(ct)).to(dy_TD.dtype)
    return grad_w_A, g2_AD


def _combine(o_AD: Tensor, pos_TK: Tensor, w_TK: Tensor | None) -> Tensor:
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


def _triton_ok(t: Tensor) -> bool:
    """Whether ``stgc.kernels`` (Triton) runs the passes over ``t``: a CUDA tensor (or ``TRITON_ON_CPU``)
    that is not fp64, Triton importable and STGC_NO_TRITON=1 not set (else the compiled or eager code).
    No size threshold: one launch (20-40 us of host time on the H200 machines, `profile_steps.py`) replaces
    several eager ops (7-8 us each) or a compiled call (29-49 us)."""
    return (
        (t.is_cuda or TRITON_ON_CPU)
        and t.dtype != torch.float64
        and os.environ.get("STGC_NO_TRITON") != "1"
        and _triton_importable()
    )


def _kernel(name: str, fn, big: Tensor):
    """``fn`` compiled with torch.compile when ``_generated(big)`` (``big``: the largest tensor it reads);
    eager otherwise."""
    if not _generated(big):
        return fn
    if name not in _COMPILED:
        # dynamic=None: token counts vary between calls, feature sizes stay static (aligned, vectorised)
        _COMPILED[name] = torch.compile(fn)
    return _COMPILED[name]


@dataclasses.dataclass
class Dispatch:
    """How one forward's (token, slot) assignments map to expert-sorted rows (A = T*K; see the legend).

    token_A / expert_A / order_A (= token * K + slot): per sorted row. pos_TK: the sorted row of each
    (token, slot). groups: the per-expert split of the rows. valid_TK: (token, slot) validity (not padding,
    not dropped) where an observer needs it, else ``None``. triton: the expert path's elementwise passes
    (and the observer's scores) run as ``stgc.kernels``. x_AD / w_A: the gathered inputs and combine
    weights when the routing kernel already produced them (else the expert path gathers them). h_AH: the
    first expert product x_AD W_in^T when the routing already issued it (``_RouteFn``); the expert path's
    forward takes it over (and sets the field to ``None``: the GELU bias is added to it in place).
    """

    token_A: Tensor
    expert_A: Tensor
    order_A: Tensor
    pos_TK: Tensor
    groups: _Groups
    triton: bool
    valid_TK: Tensor | None = None
    x_AD: Tensor | None = None
    w_A: Tensor | None = None
    h_AH: Tensor | None = None


class _ExpertsFn(torch.autograd.Function):
    """Sorted-token expert computation and combine, with a hand-written backward.

    Forward: x_A = x[token_A]; h = x_A W_in[e]^T (+b_in) (gate and up in ONE product for SwiGLU);
    a = act(h); o = a W_out[e]^T (+b_out); y[t] = sum over its K assignments of w_A * o_A. Every (token,
    slot) assignment is a row (dropped and padding ones with w_A = 0), so the row count T*K is known on the
    host and the products need no device sync (``_Groups``).
    Backward has the token-level bias gradients in hand (g2_A = w_A dy[token_A], g1_A = dL/da (SwiGLU's
    virtual bias) or dL/dh (GELU's fc1 bias)), so a gradient observer (STGC fused mode) can add a
    router-logit gradient in the same pass. ``logits_TE`` is an input only so that the observer's extra
    gradient has somewhere to go. On the Triton path (``Dispatch.triton``) each elementwise pass is one kernel
    and, for SwiGLU, the observer also gets the per-expert sums of g2 from the pass that writes g2.
    """

    @staticmethod
    def forward(ctx, x_TD, weights_TK, logits_TE, w_in, b_in, w_out, b_out, dispatch, ffn, observer, record):
        F_ = w_out.shape[-1]
        d, groups = dispatch, dispatch.groups
        x_AD = x_TD.index_select(0, d.token_A) if d.x_AD is None else d.x_AD
        w_A = weights_TK.reshape(-1).index_select(0, d.order_A) if d.w_A is None else d.w_A
        triton_path = d.triton
        if triton_path:
            from stgc import kernels
        # (the routing's first product is taken over: the bias below is added to it in place)
        h_AH, d.h_AH = (groups.rows_wt(x_AD, w_in) if d.h_AH is None else d.h_AH), None
        groups.send_sizes()  # (after the first product: nothing before it delays the GPU's start)
        if b_in is not None:
            h_AH += b_in.index_select(0, d.expert_A)
        if triton_path and ffn == "swiglu":
            a_AF = kernels.swiglu_forward(h_AH)
        else:
            a_AF = _kernel(f"act_{ffn}", _act_forward, h_AH)(ffn, h_AH, F_)
        o_AD = groups.rows_wt(a_AF, w_out)
        if b_out is not None:
            o_AD += b_out.index_select(0, d.expert_A)
        if triton_path:
            y_TD = kernels.combine(o_AD, d.pos_TK, weights_TK)
        else:
            y_TD = _kernel("combine", _combine, o_AD)(o_AD, d.pos_TK, weights_TK)
        # every tensor the backward reads goes through save_for_backward (activation checkpointing and
        # offloading manage only those): the dispatch is kept without its tensors
        ctx.save_for_backward(
            x_AD, h_AH, a_AF, o_AD, w_A, w_in, w_out, d.token_A, d.expert_A, d.order_A, d.pos_TK, d.valid_TK
        )
        ctx.groups, ctx.ffn, ctx.observer, ctx.record = groups, ffn, observer, record
        ctx.has_bias, ctx.triton_path = b_in is not None, triton_path
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
        ffn, groups, observer, triton_path = ctx.ffn, ctx.groups, ctx.observer, ctx.triton_path
        if triton_path:
            from stgc import kernels
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
        # SwiGLU on the Triton path: the observer scores from dy and the sums of g2 (``TokenGrads``)
        fast_obs = observe and triton_path and ffn == "swiglu"
        dy_TD = dy_TD.contiguous()
        # dL/dw_A = <dy_t, o_A>; g2_A = w_A * dy_t is the output-bias gradient of assignment A
        sums2_ED = None
        if triton_path:
            stats = dict(expert_A=expert_A, num_experts=E, order_A=order_A, valid_TK=valid_TK)
            grad_w_A, g2_AD, sums2_ED = kernels.rowdot_scale(
                dy_TD, token_A, o_AD, w_A, **(stats if fast_obs else {})
            )
        else:
            grad_w_A, g2_AD = _kernel("rowdot", _rowdot_scale, o_AD)(dy_TD, token_A, o_AD, w_A)
        grad_w_TK = None
        if need_w:
            grad_w_TK = torch.empty_like(grad_w_A).index_copy_(0, order_A, grad_w_A).view(pos_TK.shape)
        grad_a_AF = groups.rows_w(g2_AD, w_out)  # = the virtual first-bias gradient (SwiGLU)
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
            actb = _kernel(f"actb_{ffn}_{with_sq}", _act_backward, h_AH)
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
            if triton_path:
                grad_x_TD = kernels.combine(grad_x_AD, pos_TK, None)
            else:
                grad_x_TD = _kernel("combine", _combine, grad_x_AD)(grad_x_AD, pos_TK, None)
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


class _RouteFn(torch.autograd.Function):
    """The Triton routing (``stgc.kernels.route_and_dispatch``) as an autograd function: the router logits,
    probabilities, combine weights and aux loss are differentiable (their gradients in closed form,
    ``stgc.kernels.route_backward``); indices, counts, the dispatch and the token mask are not. ``w_in``
    (the expert bank's input projections, or ``None``) passes in a tuple, untracked: the routing then
    issues the first expert product itself (``Routed.first``, ``Dispatch.h_AH``), as early as the host
    can, whose gradients ``_ExpertsFn`` computes."""

    @staticmethod
    def forward(ctx, x_TD, w_ED, token_mask_T, top_k, count_padding, w_in=(None,)):
        from stgc.kernels import route_and_dispatch

        (w_in_EHD,) = w_in
        then = None if w_in_EHD is None else lambda x_AD, offs: grouped_rows_wt(x_AD, w_in_EHD, offs)
        r = route_and_dispatch(x_TD, w_ED, token_mask_T, top_k, count_padding, gather=True, then=then)
        ctx.save_for_backward(x_TD, w_ED, token_mask_T, r.probs_TE, r.topk_TK, r.weights_TK, r.f_E, r.n_real)
        ctx.count_padding = count_padding
        ctx.set_materialize_grads(False)
        # the rest of ``r`` (indices, counts, the dispatch) passes through untracked (fewer outputs to wrap)
        return r.logits_TE, r.probs_TE, r.weights_TK, r.aux, r

    @staticmethod
    def backward(ctx, g_logits, g_probs, g_weights, g_aux, *_):
        from stgc.kernels import route_backward

        x_TD, w_ED, token_mask_T, probs, topk, weights, f_E, n_real = ctx.saved_tensors
        if all(g is None for g in (g_logits, g_probs, g_weights, g_aux)):
            return (None,) * 6
        dx, dw = route_backward(
            x_TD, w_ED, token_mask_T, ctx.count_padding, probs, topk, weights, f_E, n_real,
            g_logits, g_probs, g_weights, g_aux,
        )  # fmt: skip
        return dx, dw.to(w_ED.dtype), None, None, None, None


def experts_reference(
    bank: ExpertBank,
    x_TD: Tensor,
    topk_idx_TK: Tensor,
    weights_TK: Tensor,
    kept_TK: Tensor,
    bias1_TKF: Tensor | None = None,
    bias2_TKD: Tensor | None = None,
) -> Tensor:
    """Plain-autograd expert computation, one expert at a time (tests and the `reference` STGC mode).

    ``bias1_TKF`` / ``bias2_TKD`` are explicit per-(token, slot) additive biases at the first (virtual or
    real) bias and the output bias: their gradients are the token-level bias gradients of STGC.md section 2.
    """
    F_ = bank.intermediate_size
    y_TD = torch.zeros_like(x_TD)
    for e in range(bank.num_experts):
        t_idx, k_idx = ((topk_idx_TK == e) & kept_TK).nonzero(as_tuple=True)
        if t_idx.numel() == 0:
            continue
        h = F.linear(x_TD[t_idx], bank.w_in[e], None if bank.b_in is None else bank.b_in[e])
        if bank.ffn == "gelu" and bias1_TKF is not None:
            h = h + bias1_TKF[t_idx, k_idx]
        a = _act_forward(bank.ffn, h, F_)
        if bank.ffn == "swiglu" and bias1_TKF is not None:
            a = a + bias1_TKF[t_idx, k_idx]
        o = F.linear(a, bank.w_out[e], None if bank.b_out is None else bank.b_out[e])
        if bias2_TKD is not None:
            o = o + bias2_TKD[t_idx, k_idx]
        y_TD = y_TD.index_add(0, t_idx, o * weights_TK[t_idx, k_idx].to(o.dtype)[:, None])
    return y_TD


# --------------------------------------------------------------------------------------------------------
# the block


class MoEBlock(nn.Module):
    """A drop-in replacement for a decoder layer's MLP: ``forward(hidden_states_BSD) -> hidden_states_BSD``.

    The router is a linear map without bias computed in fp32 (as DeepSpeed's TopKGate does). At evaluation
    routing is deterministic (top-k, no noise) and the block keeps no state between calls.
    """

    def __init__(self, config: MoEConfig, hidden_size: int, intermediate_size: int, ffn: str, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.router = nn.Linear(hidden_size, config.num_experts, bias=False)
        self.experts = ExpertBank(config.num_experts, hidden_size, intermediate_size, ffn)
        self.routing_ctx: RoutingContext | None = None
        self.use_reference_experts = False  # the plain-autograd path (tests, `reference` STGC mode)
        self.expert_products = "auto"  # see ``EXPERT_PRODUCTS`` (benchmarks and tests pick a path)
        self.use_triton = True  # ``stgc.kernels`` where ``_triton_ok`` (False: the eager/compiled code)

    def forward(self, hidden_states: Tensor) -> Tensor:
        shape = hidden_states.shape
        x_TD = hidden_states.reshape(-1, shape[-1])
        ctx = self.routing_ctx
        token_mask_T = None
        if ctx is not None and ctx.token_mask_BT is not None:
            token_mask_T = ctx.token_mask_BT.reshape(-1).to(device=x_TD.device, dtype=torch.bool)
            if token_mask_T.numel() != x_TD.shape[0]:
                raise ValueError(
                    f"routing context token mask has {token_mask_T.numel()} entries for {x_TD.shape[0]} "
                    "tokens; pass the mask of this forward's tokens (attention_mask[:, -seq_len:])."
                )
        injected = (
            None if ctx is None or ctx.injected_biases is None else ctx.injected_biases.get(self.layer_idx)
        )
        reference = injected is not None or self.use_reference_experts
        triton = self.use_triton and _triton_ok(x_TD)
        if not reference and triton and self._fast_routing():
            record, dispatch = self._route_triton(x_TD, token_mask_T, ctx)
        else:
            if token_mask_T is None:
                token_mask_T = torch.ones(x_TD.shape[0], dtype=torch.bool, device=x_TD.device)
            logits_TE = F.linear(x_TD.float(), self.router.weight.float())
            probs_TE, topk_idx_TK, weights_TK, kept_TK, tpe_E, aux = route(
                logits_TE, self.config, token_mask_T, training=self.training
            )
            record = RoutingRecord(
                layer_idx=self.layer_idx,
                logits_TE=logits_TE,
                probs_TE=probs_TE,
                topk_idx_TK=topk_idx_TK,
                weights_TK=weights_TK,
                token_mask_T=token_mask_T,
                kept_TK=kept_TK,
                tokens_per_expert_E=tpe_E,
                aux_loss=aux,
            )
            dispatch = None if reference else self._dispatch(x_TD, record, ctx, triton)
        if reference:
            r = record
            bias = () if injected is None else injected
            y_TD = experts_reference(self.experts, x_TD, r.topk_idx_TK, r.weights_TK, r.kept_TK, *bias)
        else:
            b = self.experts
            observer = ctx.observer if ctx is not None else None
            y_TD = _ExpertsFn.apply(
                x_TD,
                record.weights_TK,
                record.logits_TE,
                b.w_in,
                b.b_in,
                b.w_out,
                b.b_out,
                dispatch,
                b.ffn,
                observer,
                record,
            )
        if ctx is not None and ctx.records is not None:
            ctx.records.append(record)
        return y_TD.reshape(shape)

    def _fast_routing(self) -> bool:
        """Whether the routing can run as two Triton launches (``_RouteFn``): the default deterministic
        top-k (no capacity, no Gumbel sampling in this mode)."""
        c = self.config
        sampling = c.second_expert_sampling and (self.training or c.sample_at_eval)
        return c.capacity_factor is None and not sampling

    def _grouped(self, x_TD: Tensor) -> bool:
        """Whether the expert products are grouped with device offsets (``use_grouped_mm``)."""
        b = self.experts
        dims = (b.hidden_size, b.w_in.shape[1], b.intermediate_size)
        return use_grouped_mm(x_TD, dims, self.expert_products)

    def _groups(self, x_TD: Tensor, offsets_E: Tensor, grouped: bool | None = None) -> _Groups:
        E, mode = self.config.num_experts, self.expert_products
        if self._grouped(x_TD) if grouped is None else grouped:
            rows = x_TD.shape[0] * self.config.top_k
            split = mode == "grouped_forward" or (mode == "auto" and rows >= E * PER_EXPERT_BACKWARD_MIN_ROWS)
            split = split and torch.is_grad_enabled()  # (no backward will come: no sizes to copy)
            return _Groups(offsets_E.to(torch.int32), None, E, per_expert_backward=split)
        # one product per expert, sized on the host (a sync; CPU and unusual shapes only)
        counts = torch.diff(offsets_E.long(), prepend=offsets_E.new_zeros(1).long())
        return _Groups(None, expert_segments(counts.tolist()), self.config.num_experts)

    @staticmethod
    def _valid_TK(record: RoutingRecord, ctx: RoutingContext | None, dropping: bool) -> Tensor | None:
        """(token, slot) validity for an observer (``None``: no observer, or every assignment is valid)."""
        if ctx is None or ctx.observer is None or not (dropping or ctx.token_mask_BT is not None):
            return None
        return (record.kept_TK & record.token_mask_T[:, None]).contiguous()

    def _route_triton(
        self, x_TD: Tensor, token_mask_T: Tensor | None, ctx: RoutingContext | None
    ) -> tuple[RoutingRecord, Dispatch]:
        c = self.config
        T, K = x_TD.shape[0], c.top_k
        grouped = self._grouped(x_TD)
        first = (self.experts.w_in if grouped else None,)  # (a tuple: autograd does not track it)
        logits, probs, weights, aux, r = _RouteFn.apply(
            x_TD, self.router.weight, token_mask_T, K, c.route_padding, first
        )
        token_mask_T = r.token_mask_T if token_mask_T is None else token_mask_T
        if c.route_padding:
            kept = r.token_mask_T.new_ones(1, 1).expand(T, K)
        else:
            kept = token_mask_T[:, None].expand(T, K)
        record = RoutingRecord(
            layer_idx=self.layer_idx,
            logits_TE=logits,
            probs_TE=probs,
            topk_idx_TK=r.topk_TK,
            weights_TK=weights,
            token_mask_T=token_mask_T,
            kept_TK=kept,
            tokens_per_expert_E=r.tokens_per_expert_E,
            aux_loss=aux,
        )
        groups = self._groups(x_TD, r.offsets_E, grouped)
        valid_TK = self._valid_TK(record, ctx, dropping=False)
        return record, Dispatch(
            r.token_A, r.expert_A, r.order_A, r.pos_TK, groups, True, valid_TK, r.x_AD, r.w_A, r.first
        )

    def _dispatch(
        self, x_TD: Tensor, record: RoutingRecord, ctx: RoutingContext | None, triton: bool
    ) -> Dispatch:
        """The eager expert sort (CPU, fp64, capacity or sampling routing)."""
        E = self.config.num_experts
        expert_A, order_A, token_A, pos_TK = sort_assignments(record.topk_idx_TK)
        flat_e = record.topk_idx_TK.reshape(-1)
        counts_E = torch.zeros(E, dtype=torch.long, device=x_TD.device).index_add_(
            0, flat_e, torch.ones_like(flat_e)
        )  # (not bincount: it syncs to size its output)
        groups = self._groups(x_TD, counts_E.cumsum(0))
        valid_TK = self._valid_TK(record, ctx, dropping=self.config.capacity_factor is not None)
        return Dispatch(token_A, expert_A, order_A, pos_TK, groups, triton, valid_TK)

    @classmethod
    def from_dense(
        cls,
        config: MoEConfig,
        layer_idx: int,
        *,
        gate_proj: Tensor | None = None,
        up_proj: Tensor | None = None,
        down_proj: Tensor | None = None,
        fc1_weight: Tensor | None = None,
        fc1_bias: Tensor | None = None,
        fc2_weight: Tensor | None = None,
        fc2_bias: Tensor | None = None,
    ) -> MoEBlock:
        """Sparse upcycling: every expert is a copy of the dense FFN (nn.Linear weight layout [out, in])."""
        if gate_proj is not None:
            F_, D = gate_proj.shape
            block = cls(config, D, F_, "swiglu", layer_idx).to(gate_proj.dtype)
            with torch.no_grad():
                block.experts.w_in.copy_(torch.cat([gate_proj, up_proj], 0).expand_as(block.experts.w_in))
                block.experts.w_out.copy_(down_proj.expand_as(block.experts.w_out))
        else:
            F_, D = fc1_weight.shape
            block = cls(config, D, F_, "gelu", layer_idx).to(fc1_weight.dtype)
            with torch.no_grad():
                block.experts.w_in.copy_(fc1_weight.expand_as(block.experts.w_in))
                block.experts.b_in.copy_(fc1_bias.expand_as(block.experts.b_in))
                block.experts.w_out.copy_(fc2_weight.expand_as(block.experts.w_out))
                block.experts.b_out.copy_(fc2_bias.expand_as(block.experts.b_out))
        block.router.float()  # router in fp32 regardless of the model dtype
        return block
