"""AdaMoE's router: null experts (Zeng et al., "AdaMoE: Token-Adaptive Routing with Null Experts",
Findings of EMNLP 2024; code CengZihao/AdaMoE; docs/peers_routing.md).

The router has R = E + m columns: the bank's E true experts, then m null experts whose output is 0 and
which cost nothing. With top-k over all R columns (k raised above the baseline's: E=4, k=2 -> m=4, k=3) a
token gets 0..k true experts:

    p_t = softmax(W x_t) over R;  S_t = top-k(p_t);  T_t = S_t intersected with the true experts
    y_t = sum_{i in T_t} p_ti / (sum_{j in T_t} p_tj) E_i(x_t)      (0 when T_t is empty: the residual
                                                                    carries the token)

Null assignments are not executed (``kept_TK`` False): the eager bank never runs them and the fused bank
sorts their rows past the last expert and never computes them, so they cost no expert FLOPs; their
combine weight is 0 and the denominator is clamped, so a token with no true expert gets 0, never NaN.

Balance (``aux_loss``): L = R * sum_e f_e P_e over real tokens, f_e = the share of the top-k assignments
that go to column e (all k slots, as AdaMoE counts them), P_e = mean p_e, with the null experts' f replaced
by their mean (the nulls pooled as one: the router may use null experts as much as it likes in total, but
not prefer one of them). AdaMoE's LoRA code pools this way; its released Mixtral code assigns the mean to a
slice of the wrong dimension (top-k slots instead of experts), so its pooling is a no-op there. Padding is
excluded unless ``moe.route_padding``.

Initialisation: null row j is a copy of true row j mod E, at construction and in ``init_weights`` (AdaMoE
upcycles them this way). With exact copies every null column ties with its true column and ties go to the
lower index, so an upcycled AdaMoE layer with m = E, k = 3 starts out routing exactly as the top-2
baseline: the two best true experts, the best one's null copy second, weights renormalised over the two.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stgc.config import MoEConfig
from stgc.moe.record import RoutingContext, RoutingRecord
from stgc.moe.routers.base import Router, register_router
from stgc.moe.routers.softmax_topk import _capacity_keep


def pooled_null_balance(probs_TR: Tensor, topk_idx_TK: Tensor, count_T: Tensor, num_true: int) -> Tensor:
    """R * sum_e f_e P_e with the null experts' f replaced by their mean (module docstring)."""
    R, K = probs_TR.shape[-1], topk_idx_TK.shape[-1]
    m_T = count_T.to(probs_TR.dtype)
    n = m_T.sum().clamp_min(1)
    f_R = torch.zeros(R, dtype=probs_TR.dtype, device=probs_TR.device).index_add_(
        0, topk_idx_TK.reshape(-1), m_T[:, None].expand(-1, K).reshape(-1)
    ) / (n * K)
    f_R = torch.cat([f_R[:num_true], f_R[num_true:].mean().expand(R - num_true)])
    P_R = (probs_TR * m_T[:, None]).sum(0) / n
    return R * (f_R * P_R).sum()


@register_router
class AdaMoERouter(Router):
    """Softmax top-k over true + null experts; only true experts run (module docstring)."""

    name = "adamoe"

    def __init__(self, moe: MoEConfig, hidden_size: int, layer_idx: int):
        super().__init__(moe, hidden_size, layer_idx)
        self.weight = nn.Linear(hidden_size, self.width, bias=False).weight
        self._copy_null_rows()

    @torch.no_grad()
    def _copy_null_rows(self) -> None:
        E = self.num_experts
        source = torch.arange(E, self.width, device=self.weight.device) % E
        self.weight[E:] = self.weight[source]

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        super().init_weights(std)
        self._copy_null_rows()

    def logits(self, x_TD: Tensor) -> Tensor:
        return torch.nn.functional.linear(x_TD.float(), self.weight.float())

    def forward(self, x_TD: Tensor, token_mask_T: Tensor, ctx: RoutingContext | None) -> RoutingRecord:
        c, E, R, K = self.moe, self.num_experts, self.width, self.moe.top_k
        logits_TR = self.logits(x_TD)
        probs_TR = logits_TR.softmax(-1)
        # ties to the lower column: a true expert before its null copy
        topk_idx_TK = torch.sort(probs_TR, dim=-1, descending=True, stable=True).indices[:, :K].contiguous()
        count_T = torch.ones_like(token_mask_T) if c.route_padding else token_mask_T
        kept_TK = topk_idx_TK < E
        capacity = c.capacity(self.training)
        if capacity is not None:  # C = ceil(cf * K * T / R): a uniform router's load per column
            kept_TK = kept_TK & _capacity_keep(topk_idx_TK, count_T, capacity, c.min_capacity, R)
        if not c.route_padding:
            kept_TK = kept_TK & token_mask_T[:, None]
        p_TK = probs_TR.gather(1, topk_idx_TK) * kept_TK
        weights_TK = p_TK / p_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(p_TK.dtype).eps)
        counted_TK = kept_TK & token_mask_T[:, None]
        tokens_per_expert_E = torch.zeros(R, dtype=torch.long, device=x_TD.device).index_add_(
            0, topk_idx_TK.reshape(-1), counted_TK.reshape(-1).long()
        )[:E]
        extras = {}
        if ctx is not None and ctx.modality_BT is not None:
            extras["modality_T"] = ctx.modality_BT.reshape(-1).to(x_TD.device)
        return RoutingRecord(
            layer_idx=self.layer_idx,
            logits_TE=logits_TR,
            probs_TE=probs_TR,
            topk_idx_TK=topk_idx_TK,
            weights_TK=weights_TK,
            token_mask_T=token_mask_T,
            kept_TK=kept_TK,
            tokens_per_expert_E=tokens_per_expert_E,
            aux_loss=pooled_null_balance(probs_TR, topk_idx_TK, count_T, E),
            extras=extras,
        )

    def extra_repr(self) -> str:
        nulls = self.width - self.num_experts
        return f"D={self.hidden_size}, E={self.num_experts} + {nulls} null, K={self.moe.top_k}"
