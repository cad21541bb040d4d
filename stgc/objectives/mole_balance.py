"""LLaVA-MoLE's load-balancing loss (docs/baselines.md, "LLaVA-MoLE"): per sample, pooled over every MoE layer
and the sample's real tokens, then averaged over samples."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from stgc.moe.record import RoutingRecord
from stgc.objectives.base import Objective, register_objective


def mole_balance(records: list[RoutingRecord], batch_size: int) -> Tensor:
    """(1 / B') sum_b sum_e P_be * f_be with, for sample b, P_be = mean of p_te and f_be = mean of
    1[argmax_t = e] over the pairs (MoE layer, real token t of b): one pool per sample across all layers.
    No x E factor (the minimum is 1/E at a uniform split). Padding tokens are excluded; image tokens count
    as any other real token. B' = samples with at least one real token. argmax is the top-1 choice
    (``topk_idx_TK[:, 0]``), the same under top-1 and the dense soft mixture."""
    if not records:
        raise ValueError("mole_balance: no routing records in this forward; nothing to balance.")
    E = records[0].probs_TE.shape[-1]
    P_BE = f_BE = n_B = None
    for r in records:
        m_BS = r.token_mask_T.reshape(batch_size, -1).to(r.probs_TE.dtype)
        p_BSE = r.probs_TE.reshape(batch_size, -1, E)
        top1_BSE = F.one_hot(r.topk_idx_TK[:, 0], E).reshape(batch_size, -1, E).to(p_BSE.dtype)
        p_sum = (p_BSE * m_BS[..., None]).sum(1)
        f_sum = (top1_BSE * m_BS[..., None]).sum(1)
        n = m_BS.sum(1)
        P_BE, f_BE, n_B = (p_sum, f_sum, n) if P_BE is None else (P_BE + p_sum, f_BE + f_sum, n_B + n)
    has_B = n_B > 0
    per_sample_B = (P_BE * f_BE).sum(-1) / n_B.clamp_min(1).square()
    return per_sample_B[has_B].sum() / has_B.sum().clamp_min(1)


@register_objective
class MoLEBalance(Objective):
    """coef * ``mole_balance`` (``method.mole_balance.coef``): a forward term like the baseline's balance
    loss (so STGC's two_pass and reference token gradients include its gradient, as the fused mode's do),
    pooled per sample with the batch size the block records (``RoutingRecord.batch_size``)."""

    name = "mole_balance"

    def terms(self, records: list[RoutingRecord], step: int) -> dict[str, Tensor]:
        sizes = {r.batch_size for r in records}
        if None in sizes or len(sizes) != 1:
            raise ValueError(
                "mole_balance pools per sample and needs the batch size of the forward: run the model on "
                f"(batch, sequence, hidden) inputs (the records give batch sizes {sorted(sizes, key=str)})."
            )
        return {"mole_bal": mole_balance(records, sizes.pop())}

    def coefficients(self, step: int) -> dict[str, float]:
        return {"mole_bal": self.config.coef}
