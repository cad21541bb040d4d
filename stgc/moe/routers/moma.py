"""MoMa's modality-aware experts (Lin et al., "MoMa: Efficient Early-Fusion Pre-training with Mixture of
Modality-Aware Experts", 2024; no official code) in the token-choice form LTDR evaluated on STGC's testbed
(docs/peers_routing.md).

The bank's experts split into an image group (columns [0, G_I)) and a text group ([G_I, E)); a token routes
only inside the group of its modality (``RoutingContext.modality_BT``, set by the model from the image-token
expansion in training, evaluation and capture; every non-image token is text). Attention stays shared.

token_choice (default): p^g_t = softmax over the group of W_g x_t; top-k inside the group (MoE-LLaVA's
    rule: renormalised weights, its capacity option per group: C_g = ceil(cf * k * T_g / G_g)).
expert_choice (option, image tokens only; text stays token-choice): each image expert j scores the image
    tokens of each sample's image block by sigmoid(z_tj) and takes its top c_b = ceil(n_b * k / G_I) of
    them (MoMa's capacity 1/G for k = 1); a token picked by more than k experts keeps its k best picks
    [ours: the record has k slots]; the combine weight is the sigmoid score (MoMa's, not renormalised).
    The whole image block is in the prompt, so this is causal at prefill; decoding steps have no image
    tokens. [ours: plain sigmoid, no Gumbel noise in training, so that routing is deterministic.]

Record: ``probs_TE`` the token's group distribution (the softmax over its group's logits, 0 outside the
group; also for expert-choice image tokens, whose choice and weights are the sigmoid scores);
``logits_TE`` the raw logits with gradient only through the token's own group's columns, so that
objectives reading the logits (STGC's L_cel, z-loss) change only the group the token routes in (their
normalisers still see the other group's logits, as constants) [ours].
``aux_loss``: each token-choice group's balance loss E_g * sum_e f_e P_e over its own real tokens (top-1 f,
MoE-LLaVA's form), weighted by the group's share of the real tokens (the sum is 1 when every group is
uniform); expert-choice groups are balanced by construction and add nothing (MoMa uses no balance loss).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stgc.config import MoEConfig
from stgc.moe.record import RoutingContext, RoutingRecord
from stgc.moe.routers.base import Router, register_router
from stgc.moe.routers.softmax_topk import route

# stgc.modeling.MODALITY_IMAGE (not imported: stgc.modeling imports this package; a test holds them equal)
IMAGE_CODE = 1


def modality_of(ctx: RoutingContext | None, num_tokens: int, who: str) -> Tensor:
    """The forward's modality codes, flattened to (T,); a clear error where the caller gave none."""
    if ctx is None or ctx.modality_BT is None:
        raise ValueError(
            f"the {who} router needs each token's modality (RoutingContext.modality_BT); the MoE-LLaVA "
            "model sets it from input_ids, so pass input_ids (not only inputs_embeds), or set modality_BT "
            "in the routing context."
        )
    modality_T = ctx.modality_BT.reshape(-1)
    if modality_T.numel() != num_tokens:
        raise ValueError(
            f"RoutingContext.modality_BT has {modality_T.numel()} entries for {num_tokens} tokens; pass the "
            "codes of this forward's tokens."
        )
    return modality_T


def expert_choice(score_TG: Tensor, block_BS: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Per sample b, each of the G experts picks its top ceil(n_b * top_k / G) tokens of the block
    ``block_BS`` (n_b tokens) by score; each token keeps its ``top_k`` best picks. Returns
    (topk_idx_TK, kept_TK), slots by descending score; unpicked slots name the next-best experts, not kept.
    No host sync (ranks from a sort along the sequence)."""
    B, S = block_BS.shape
    G = score_TG.shape[-1]
    s_BSG = score_TG.detach().reshape(B, S, G).masked_fill(~block_BS[..., None], -1.0)
    order_BSG = torch.sort(s_BSG, dim=1, descending=True, stable=True).indices
    rank_BSG = torch.empty_like(order_BSG).scatter_(
        1, order_BSG, torch.arange(S, device=s_BSG.device)[None, :, None].expand(B, S, G)
    )
    capacity_B = torch.ceil(block_BS.sum(1).to(torch.float64) * top_k / G).long()
    picked_TG = ((rank_BSG < capacity_B[:, None, None]) & block_BS[..., None]).reshape(B * S, G)
    key_TG = torch.where(picked_TG, score_TG.detach(), score_TG.detach() - 2.0)  # picks first
    topk_idx_TK = torch.sort(key_TG, dim=-1, descending=True, stable=True).indices[:, :top_k]
    return topk_idx_TK, picked_TG.gather(1, topk_idx_TK)


@register_router
class MoMaRouter(Router):
    """Routing inside the token's modality group (module docstring)."""

    name = "moma"

    def __init__(self, moe: MoEConfig, hidden_size: int, layer_idx: int):
        super().__init__(moe, hidden_size, layer_idx)
        self.weight = nn.Linear(hidden_size, self.width, bias=False).weight
        self.image_experts = moe.router.image_experts

    def logits(self, x_TD: Tensor) -> Tensor:
        return torch.nn.functional.linear(x_TD.float(), self.weight.float())

    def forward(self, x_TD: Tensor, token_mask_T: Tensor, ctx: RoutingContext | None) -> RoutingRecord:
        c, E, Gi, K = self.moe, self.num_experts, self.image_experts, self.moe.top_k
        T = x_TD.shape[0]
        modality_T = modality_of(ctx, T, "moma").to(x_TD.device)
        image_T = modality_T == IMAGE_CODE
        logits_TE = self.logits(x_TD)
        groups = ((0, Gi, image_T), (Gi, E, ~image_T))
        n = token_mask_T.sum().clamp_min(1)
        parts, aux = [], logits_TE.new_zeros(())
        for start, end, member_T in groups:
            mask_T = token_mask_T & member_T
            z_TG = logits_TE[:, start:end]
            if start == 0 and c.router.image_routing == "expert_choice":
                assert ctx is not None and ctx.modality_BT is not None  # (modality_of checked it)
                block_BS = (mask_T).reshape(ctx.modality_BT.shape)
                score_TG = torch.sigmoid(z_TG)
                topk_TK, kept_TK = expert_choice(score_TG, block_BS, K)
                weights_TK = score_TG.gather(1, topk_TK) * kept_TK
                # the record's distribution: the group softmax (the scores that chose are sigmoids)
                probs_TG = z_TG.softmax(-1) * member_T[:, None]
                tpe_G = torch.zeros(end - start, dtype=torch.long, device=x_TD.device).index_add_(
                    0, topk_TK.reshape(-1), kept_TK.reshape(-1).long()
                )
            else:
                probs_TG, topk_TK, weights_TK, kept_TK, tpe_G, aux_g = route(
                    z_TG, c, mask_T, training=self.training
                )
                probs_TG = probs_TG * member_T[:, None]
                aux = aux + aux_g * mask_T.sum() / n
            parts.append((topk_TK + start, weights_TK, kept_TK, probs_TG, tpe_G))
        (ti, wi, ki, pi, ni), (tt, wt, kt, pt, nt) = parts
        img_TK = image_T[:, None]
        own_TE = torch.cat([image_T[:, None].expand(T, Gi), (~image_T)[:, None].expand(T, E - Gi)], dim=1)
        return RoutingRecord(
            layer_idx=self.layer_idx,
            logits_TE=torch.where(own_TE, logits_TE, logits_TE.detach()),
            probs_TE=torch.cat([pi, pt], dim=1),
            topk_idx_TK=torch.where(img_TK, ti, tt),
            weights_TK=torch.where(img_TK, wi, wt),
            token_mask_T=token_mask_T,
            kept_TK=torch.where(img_TK, ki, kt),
            tokens_per_expert_E=torch.cat([ni, nt]),
            aux_loss=aux,
            extras={"modality_T": modality_T},
        )

    def extra_repr(self) -> str:
        r = self.moe.router
        return f"D={self.hidden_size}, image {r.image_experts} + text {r.text_experts}, K={self.moe.top_k}"
