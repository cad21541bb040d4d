"""LLaVA-MoLE's router (Chen et al. 2024, "LLaVA-MoLE: Sparse Mixture of LoRA Experts for Mitigating Data
Conflicts in Instruction Finetuning MLLMs"; released inference code forwchen/LLaVA-MoLE, ``moe.py``): a
linear router with a bias, softmax, top-1, whose combine weight is the chosen expert's probability.

Why not the ``softmax_topk`` router with ``bias=True``: that router renormalises the combine weights over
the chosen experts (DeepSpeed's top-k gate), which at top-1 makes every weight exactly 1, so the LM loss
sends no gradient to the router (the released sparse path has the same property: it does not scale the
expert output at all, and its router learns from the balance loss alone). Here the weight is p itself
(Switch Transformer's top-1 gate), the default this project chose [ours, docs/baselines.md]. With top_k equal
to the number of experts the weights are p over every expert: the released configuration's dense soft
mixture sum_i p_i dW_i x (``model.moe.top_k=<num_experts>``).
"""

from __future__ import annotations

from torch import Tensor

from stgc.moe.record import RoutingRecord
from stgc.moe.routers.base import register_router
from stgc.moe.routers.softmax_topk import SoftmaxTopKRouter, routed_record


@register_router
class MoLERouter(SoftmaxTopKRouter):
    """logits = W x + b (fp32), p = softmax(logits), top-k of p (ties to the lower index); combine weights
    weights_TK = p at the chosen experts (0 where an assignment does not run), not renormalised. The
    record's ``aux_loss`` is the standard E * sum_e f_e P_e (the ``load_balance`` objective's); LLaVA-MoLE's
    own balance, pooled per sample over all layers, is the ``mole_balance`` objective. Capacity and
    sampling options of ``MoEConfig`` apply as for ``softmax_topk``."""

    name = "mole"

    def record(self, logits_TE: Tensor, token_mask_T: Tensor) -> RoutingRecord:
        return routed_record(self, logits_TE, token_mask_T, renormalise=False)
