"""MoE-LLaVA's router: DeepSpeed's top-k gate (docs/method.md, "The base model"), the readable version.
The fused routing (``stgc.moe.fused``) computes the same thing in two Triton launches where it applies;
``tests/test_fast_paths.py`` holds the two equal."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stgc.config import MoEConfig
from stgc.moe.record import RoutingContext, RoutingRecord
from stgc.moe.routers.base import Router, register_router


@register_router
class SoftmaxTopKRouter(Router):
    """logits = W x (+ b), fp32 (as DeepSpeed's TopKGate); p = softmax(logits); top-k of p (ties to the
    lower expert index); combine weights renormalised over the chosen experts; DeepSpeed's load-balancing
    loss, capacity limit (``moe.capacity_factor`` in training, ``moe.eval_capacity_factor`` at evaluation)
    and Gumbel-sampled 2nd expert as options of ``MoEConfig``."""

    name = "softmax_topk"

    def __init__(self, moe: MoEConfig, hidden_size: int, layer_idx: int):
        super().__init__(moe, hidden_size, layer_idx)
        # nn.Linear's layout and init (the parameter names are the checkpoint's: router.weight)
        layer = nn.Linear(hidden_size, self.width, bias=moe.router.bias)
        self.weight = layer.weight
        self.bias = layer.bias

    def logits(self, x_TD: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x_TD.float(), self.weight.float(), bias)

    def forward(self, x_TD: Tensor, token_mask_T: Tensor, ctx: RoutingContext | None) -> RoutingRecord:
        return self.record(self.logits(x_TD), token_mask_T)

    def route_dense(
        self, logits_TR: Tensor, outputs_TED: Tensor, token_mask_T: Tensor, ctx: RoutingContext | None
    ) -> RoutingRecord:
        """A dense step routes as any other (the outputs are only combined): the default competition-free
        behaviour that a competition router overrides."""
        return self.record(logits_TR, token_mask_T)

    def record(self, logits_TE: Tensor, token_mask_T: Tensor) -> RoutingRecord:
        return routed_record(self, logits_TE, token_mask_T)

    def extra_repr(self) -> str:
        return f"D={self.hidden_size}, E={self.width}, K={self.moe.top_k}, bias={self.bias is not None}"


def routed_record(
    router: Router,
    logits_TE: Tensor,
    token_mask_T: Tensor,
    *,
    renormalise: bool = True,
    extras: dict[str, Tensor] | None = None,
) -> RoutingRecord:
    """The record of ``route`` over ``logits_TE`` for ``router`` (its MoE settings, layer and mode).
    renormalise=False: the combine weights are p at the chosen experts (0 where an assignment does not
    run), not renormalised over them (Switch Transformer's top-1 gate; MoLE, MoCLE's cluster gate)."""
    probs, topk, weights, kept, tpe, aux = route(
        logits_TE, router.moe, token_mask_T, training=router.training
    )
    if not renormalise:
        weights = probs.gather(1, topk) * kept
    return RoutingRecord(
        layer_idx=router.layer_idx,
        logits_TE=logits_TE,
        probs_TE=probs,
        topk_idx_TK=topk,
        weights_TK=weights,
        token_mask_T=token_mask_T,
        kept_TK=kept,
        tokens_per_expert_E=tpe,
        aux_loss=aux,
        extras=extras if extras is not None else {},
    )


def route(
    logits_TE: Tensor, config: MoEConfig, token_mask_T: Tensor, *, training: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Top-k routing with renormalised combine weights, DeepSpeed's load-balancing loss and optional capacity.

    Returns probs_TE, topk_idx_TK, weights_TK, kept_TK, tokens_per_expert_E, aux_loss.
    L_aux = E * sum_e f_e * P_e, f_e = share of real tokens whose top-1 expert is e (before dropping, as
    DeepSpeed computes it), P_e = mean router probability of e over real tokens. With ``route_padding``
    every token counts, which reproduces MoE-LLaVA exactly.
    """
    E, K = logits_TE.shape[-1], config.top_k
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
    capacity = config.capacity(training)
    if capacity is not None:
        kept_TK = _capacity_keep(topk_idx_TK, count_mask_T, capacity, config.min_capacity, E)
    kept_TK = kept_TK & token_mask_T[:, None] if not config.route_padding else kept_TK

    gathered_TK = probs_TE.gather(1, topk_idx_TK) * kept_TK
    # DeepSpeed clamps the denominator at fp32 eps: a token with every assignment dropped gets weight 0.
    weights_TK = gathered_TK / gathered_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(probs_TE.dtype).eps)
    counted_TK = kept_TK & token_mask_T[:, None]
    tokens_per_expert_E = torch.zeros(E, device=logits_TE.device, dtype=torch.long).index_add_(
        0, topk_idx_TK.reshape(-1), counted_TK.reshape(-1).long()
    )  # (no boolean indexing: it would force a host sync every layer)
    return probs_TE, topk_idx_TK, weights_TK, kept_TK, tokens_per_expert_E, aux_loss


def _capacity_keep(
    topk_idx_TK: Tensor, count_mask_T: Tensor, capacity_factor: float, min_capacity: int, E: int
) -> Tensor:
    """DeepSpeed's capacity: C = max(ceil(cf * K * T / E), min_capacity); positions are given to all top-1
    assignments in token order, then to the top-2 ones, ...; assignments at position >= C are dropped.
    Tokens outside ``count_mask_T`` take no position (MoE-LLaVA counts padding: ``route_padding``)."""
    T, K = topk_idx_TK.shape
    # computed on the device (a host int would sync every layer); fp64 so that ceil matches Python's
    n = count_mask_T.sum().to(torch.float64)
    capacity = torch.ceil(capacity_factor * K * n / E).clamp_min(min_capacity)
    keep_TK = torch.zeros_like(topk_idx_TK, dtype=torch.bool)
    offset_E = torch.zeros(E, dtype=torch.long, device=topk_idx_TK.device)
    for k in range(K):
        onehot_TE = F.one_hot(topk_idx_TK[:, k], E) * count_mask_T[:, None]
        pos_TE = onehot_TE.cumsum(0) - 1 + offset_E
        pos_T = (pos_TE * onehot_TE).sum(-1)
        keep_TK[:, k] = (pos_T < capacity) & count_mask_T
        offset_E = offset_E + onehot_TE.sum(0)
    return keep_TK
