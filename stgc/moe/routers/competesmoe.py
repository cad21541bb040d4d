"""CompeteSMoE (v2)'s router (Nguyen et al., "CompeteSMoE"; code Fsoft-AIC/CompeteSMoE,
moe_model/model/moe/competesmoe.py; docs/peers_routing.md).

Two policies. The router policy, on ordinary steps and always at evaluation, is MoE-LLaVA's softmax top-k
(this class is ``SoftmaxTopKRouter`` with its options). The competition policy runs on the steps where the
``competesmoe`` objective schedules this layer (``RoutingContext.dense_layers``): the MoE block runs every
expert on every token and ``route_dense`` lets the experts' outputs choose,

    s_ti = mean over the hidden dim of softplus(o_ti)        (the "neural response" of expert i)
    S^C_t = top-k of s_t;  y_t = sum_{i in S^C_t} s_ti / (sum_{j in S^C_t} s_tj) o_ti

the router's output not being used for the forward. The record of a competition step carries the router's
own logits and distribution (what distillation and STGC's L_cel act on), the winners as its executed
assignment (what STGC tests), and the competition-side balance loss E * sum_e f_e P_e over (S^C top-1,
softmax(s)) as its ``aux_loss`` (CompeteSMoE applies it in place of the router policy's on that layer and
step). ``extras``: ``responses_TE`` (s, with its gradient to the experts) and ``winner_outputs_TKD``
(o of the winners, for the diversity loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from stgc.moe.record import RoutingContext, RoutingRecord
from stgc.moe.routers.base import register_router
from stgc.moe.routers.softmax_topk import SoftmaxTopKRouter


def neural_responses(outputs_TED: Tensor) -> Tensor:
    """s_TE = mean over D of softplus(o_TED), in fp32 or wider (CompeteSMoE v2's affinity score)."""
    return F.softplus(outputs_TED.to(torch.promote_types(outputs_TED.dtype, torch.float32))).mean(-1)


@register_router
class CompeteSMoERouter(SoftmaxTopKRouter):
    """Softmax top-k on ordinary steps; the experts' competition on dense steps (module docstring)."""

    name = "competesmoe"

    def route_dense(
        self, logits_TR: Tensor, outputs_TED: Tensor, token_mask_T: Tensor, ctx: RoutingContext | None
    ) -> RoutingRecord:
        T, E, D = outputs_TED.shape
        K = self.moe.top_k
        s_TE = neural_responses(outputs_TED)
        # ties to the lower expert index, as the router policy's top-k
        winners_TK = torch.sort(s_TE.detach(), dim=-1, descending=True, stable=True).indices[:, :K]
        s_TK = s_TE.gather(1, winners_TK)
        count_T = torch.ones_like(token_mask_T) if self.moe.route_padding else token_mask_T
        kept_TK = count_T[:, None].expand(T, K)
        # softplus is positive, so the sum is too; a token outside count_T gets weight 0
        weights_TK = s_TK / s_TK.sum(-1, keepdim=True) * kept_TK
        m_T = count_T.to(s_TE.dtype)
        n = m_T.sum().clamp_min(1)
        f_E = torch.zeros(E, dtype=s_TE.dtype, device=s_TE.device).index_add_(0, winners_TK[:, 0], m_T) / n
        P_E = (s_TE.softmax(-1) * m_T[:, None]).sum(0) / n
        counted_TK = kept_TK & token_mask_T[:, None]
        tokens_per_expert_E = torch.zeros(E, dtype=torch.long, device=s_TE.device).index_add_(
            0, winners_TK.reshape(-1), counted_TK.reshape(-1).long()
        )
        winner_outputs_TKD = outputs_TED.gather(1, winners_TK[..., None].expand(T, K, D))
        return RoutingRecord(
            layer_idx=self.layer_idx,
            logits_TE=logits_TR,
            probs_TE=logits_TR.softmax(-1),
            topk_idx_TK=winners_TK,
            weights_TK=weights_TK,
            token_mask_T=token_mask_T,
            kept_TK=kept_TK,
            tokens_per_expert_E=tokens_per_expert_E,
            aux_loss=E * (f_E * P_E).sum(),
            extras={"responses_TE": s_TE, "winner_outputs_TKD": winner_outputs_TKD},
        )
