"""ST-MoE's router z-loss (Zoph et al. 2022, "ST-MoE: Designing Stable and Transferable Sparse Expert
Models", eq. 5): it keeps router logits small, which keeps the softmax out of its saturated, round-off
prone range. CompeteSMoE's recipe uses it with coefficient 0.001."""

from __future__ import annotations

import torch
from torch import Tensor

from stgc.moe.record import RoutingRecord
from stgc.objectives.base import Objective, register_objective


def z_loss(record: RoutingRecord) -> Tensor:
    """Mean over the layer's real tokens of logsumexp(logits_t)^2 (padding excluded; fp32)."""
    lse_T = torch.logsumexp(record.logits_TE.float(), dim=-1)
    m = record.token_mask_T.to(lse_T.dtype)
    return (lse_T.square() * m).sum() / m.sum().clamp_min(1)


@register_objective
class ZLoss(Objective):
    """coef * sum over MoE layers of ``z_loss`` (``method.z_loss.coef``)."""

    name = "z_loss"

    def terms(self, records: list[RoutingRecord], step: int) -> dict[str, Tensor]:
        return {"z": sum(z_loss(r) for r in records)}

    def coefficients(self, step: int) -> dict[str, float]:
        return {"z": self.config.coef}
