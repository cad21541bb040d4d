"""MoE-LLaVA's load-balancing loss (DeepSpeed / Switch form; docs/method.md, "The base model")."""

from __future__ import annotations

import torch
from torch import Tensor

from stgc.moe.record import RoutingRecord
from stgc.objectives.base import Objective, register_objective


def balance_loss(record: RoutingRecord, count_padding: bool = False) -> Tensor:
    """E * sum_e f_e P_e of one layer: f_e the share of counted tokens whose top-1 expert is e (before any
    dropping), P_e the mean router probability of e over counted tokens. Counted tokens are the real ones
    (all of them with ``count_padding``, MoE-LLaVA's ``route_padding``). The definition; routers compute it
    themselves (``RoutingRecord.aux_loss``: the fused router inside its kernel)."""
    probs = record.probs_TE
    E = probs.shape[-1]
    m = torch.ones_like(record.token_mask_T) if count_padding else record.token_mask_T
    m = m.to(probs.dtype)
    n = m.sum().clamp_min(1)
    f_E = (
        torch.zeros(E, dtype=probs.dtype, device=probs.device).index_add_(0, record.topk_idx_TK[:, 0], m) / n
    )
    P_E = (probs * m[:, None]).sum(0) / n
    return E * (f_E * P_E).sum()


@register_objective
class LoadBalance(Objective):
    """alpha * sum over MoE layers of each router's load-balancing loss (``RoutingRecord.aux_loss``),
    alpha = ``model.moe.aux_loss_coef``. Padding is excluded unless ``model.moe.route_padding``."""

    name = "load_balance"

    def terms(self, records: list[RoutingRecord], step: int) -> dict[str, Tensor]:
        missing = [r.layer_idx for r in records if r.aux_loss is None]
        if missing:
            raise ValueError(
                f"load_balance: the routers of layers {missing} have no load-balancing loss; drop "
                "load_balance from method.objectives or use the method's own balance objective."
            )
        return {"aux": sum(r.aux_loss for r in records)}

    def coefficients(self, step: int) -> dict[str, float]:
        return {"aux": self.moe.aux_loss_coef}
