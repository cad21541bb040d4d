"""What routing produces and what flows around a MoE block: the routing record, the token gradients an
observer receives in the backward, and the per-forward routing context (docs/architecture.md, "The MoE
layer").

Shape legend (every file of ``stgc.moe``): B batch, S sequence, T tokens (flattened B x S), D model dim,
F expert FFN dim, H the experts' input-projection width (2F for SwiGLU: gate and up in one matrix; F for
GELU), E experts of the bank, R the router's width (E, or more: AdaMoE's null experts), K top-k,
A (token, slot) assignment rows in expert-sorted order: all T*K of them (a dropped, padding or null
assignment is a row with combine weight 0, so the row count is known on the host and nothing waits for
the device).

Routing leaves a block in one way only: a ``RoutingRecord`` appended to the active ``RoutingContext`` (set
by the model around a forward, ``routing_context``). Layers keep their signatures.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Protocol

from torch import Tensor, nn


@dataclasses.dataclass
class RoutingRecord:
    """What one MoE layer decided in one forward. Tensors are over the T = B*S flattened tokens.

    logits_TR: router logits, fp32, carrying gradient in training (the objectives are functions of it).
    probs_TR: the router's distribution (softmax of the logits, or the router's own rule), fp32.
    topk_idx_TK: chosen router columns per token, by probability (descending); a column >= the bank's
        expert count is a null expert (AdaMoE).
    weights_TK: combine weights; 0 where an assignment does not run (dropped, padding, null).
    token_mask_T: True for real tokens, False for padding (padding is routed but never counted).
    kept_TK: True where an assignment runs an expert of the bank: not dropped by the capacity limit and not
        a null expert (padding is kept unless it is masked out: ``token_mask_T`` separates it).
    tokens_per_expert_E: executed assignments of real tokens per expert of the bank (all K slots).
    aux_loss: the router's load-balancing loss E * sum_e f_e P_e over real tokens, unscaled (the fused
        router computes it inside its kernel; ``stgc.objectives.load_balance.balance_loss`` is the
        definition and a test holds them equal). ``None`` where the router has no such loss.
    extras: router-specific outputs its objectives read (e.g. a competition's neural responses).
    batch_size: B, the samples of the forward (set by the block; ``None`` for a flat input), for terms
        pooled per sample (LLaVA-MoLE's balance loss).
    """

    layer_idx: int
    logits_TE: Tensor
    probs_TE: Tensor
    topk_idx_TK: Tensor
    weights_TK: Tensor
    token_mask_T: Tensor
    kept_TK: Tensor
    tokens_per_expert_E: Tensor
    aux_loss: Tensor | None
    extras: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    batch_size: int | None = None

    @property
    def num_experts(self) -> int:
        """The router's width R (the bank's experts plus any null experts)."""
        return self.logits_TE.shape[-1]

    @property
    def num_bank_experts(self) -> int:
        return self.tokens_per_expert_E.shape[-1]

    @property
    def top_k(self) -> int:
        return self.topk_idx_TK.shape[-1]

    def executed_TK(self) -> Tensor:
        """(token, slot) pairs that ran an expert for a real token: what token gradients exist for."""
        return self.kept_TK & self.token_mask_T[:, None]


@dataclasses.dataclass
class TokenGrads:
    """The token-level bias gradients of one MoE layer (docs/method.md, "Token gradients"), handed to a
    ``GradObserver`` inside the layer's backward. Rows are all T*K (token, slot) assignments in expert-sorted
    order; dropped, null and padding assignments are rows too (their gradients are zero) and ``rows_valid()``
    marks them False.

    g1_AF: gradient at the first bias: dL/da at the down projection's input (SwiGLU's virtual bias) or
        dL/dh at fc1's bias (GELU). g2_AD: gradient at the output bias, w_A * dL/dy_t.
    expert_A / token_A / order_A (= token * K + slot): expert, token and assignment of each row;
        pos_TK: the row of each (token, slot).
    valid_TK: (token, slot) validity (executed, real token), ``None`` when every assignment is valid (known
        on the host without a device sync).
    The fused bank's extras (``None`` from the eager bank): sq1_A: |g1_a|^2 in fp32 (SwiGLU), computed in the
    pass that produced g1. w_out_EDF: SwiGLU's down projections: g1 = g2 @ W_out[e] exactly, so per-expert
    sums of g1 and dot products with g1 can be taken from g2 and W_out without another pass over g1.
    dy_TD / sums2_ED: g2_a = w_a dy[token_a], and the fp32 sums of g2 over each expert's valid rows, so that
    an observer can score every assignment from one read of dy (``stgc.moe.fused.observer_kernels``).
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
    """Called inside each MoE layer's backward with the layer's ``RoutingRecord`` and ``TokenGrads``.
    Returns an extra gradient for the router logits (T, R) to add to the ordinary one (STGC's fused conflict
    elimination loss), or ``None``. An observer with ``active = False`` is skipped."""

    def __call__(self, record: RoutingRecord, grads: TokenGrads) -> Tensor | None: ...


@dataclasses.dataclass(frozen=True)
class FirstPass:
    """What two_pass's first backward needs of each MoE layer (``stgc.conflict.two_pass_first_pass``), set
    as ``observer.first_pass`` for that backward: token gradients and input gradients, no weight gradients;
    no input gradient in ``stop_layer`` (nothing below its router needs one); ``keep_layer`` (or ``None``)
    runs its whole backward and keeps it for the second backward, whose upstream gradient there is the same
    (the fused bank's backward; the eager bank ignores the plan and computes everything)."""

    stop_layer: int
    keep_layer: int | None


@dataclasses.dataclass
class RoutingContext:
    """Per-forward routing state shared by every MoE block of a model.

    token_mask_BT: real-token mask for the tokens of this forward (B, S) or ``None`` (all real).
    records: when a list, each block appends its ``RoutingRecord`` (in layer order of execution).
    observer: a ``GradObserver`` called inside each block's backward; ``None`` means no token gradients.
    modality_BT: int codes per token (``stgc.modeling.MODALITY_TEXT`` / ``MODALITY_IMAGE``), set by the
        model from the image-token expansion; read by modality-aware routers and by analysis.
    cluster_B: one int per sample (an instruction cluster), for routers that take it as an input.
    dense_layers: layer indices told to run every expert on every token in this forward (a competition
        step); ``None``: none.
    injected_biases: {layer_idx: (bias1_TKF, bias2_TKD)} explicit per-(token, slot) zero biases whose
        gradients are the token-level bias gradients (the `reference` STGC mode); the layers named run the
        eager bank.
    input_hook: ``f(layer_idx, hidden_states_BSD, ctx) -> hidden_states_BSD`` applied to every MoE block's
        input before routing, e.g. an identity whose backward rescales the gradient per token (AGM's
        modality modulation); ``None``: none.
    """

    token_mask_BT: Tensor | None = None
    records: list[RoutingRecord] | None = None
    observer: GradObserver | None = None
    modality_BT: Tensor | None = None
    cluster_B: Tensor | None = None
    dense_layers: frozenset[int] | None = None
    injected_biases: dict[int, tuple[Tensor, Tensor]] | None = None
    input_hook: Callable[[int, Tensor, RoutingContext], Tensor] | None = None


@contextlib.contextmanager
def routing_context(model: nn.Module, ctx: RoutingContext) -> Iterator[RoutingContext]:
    """Attach ``ctx`` to every MoE block of ``model`` for the duration of a forward (and its backward: the
    observer and records are captured by the autograd graph, so the context may be left before
    ``loss.backward()``)."""
    blocks = [m for m in model.modules() if hasattr(m, "routing_ctx")]
    previous = [b.routing_ctx for b in blocks]
    for b in blocks:
        b.routing_ctx = ctx
    try:
        yield ctx
    finally:
        for b, p in zip(blocks, previous, strict=True):
            b.routing_ctx = p
