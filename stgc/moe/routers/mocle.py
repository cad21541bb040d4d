"""MoCLE-style instruction clusters in the router (Gou et al., "Mixture of Cluster-conditional LoRA
Experts for Vision-language Instruction Tuning", 2023, code gyhdog99/MoCLE (inference only); the LTDR
variant on STGC's testbed; docs/peers_routing.md).

Each sample's instruction has a cluster id c_b (K-means over sentence embeddings of the training
instructions, fitted once per training set and saved with the model: ``stgc.clusters``), which reaches the
router as ``RoutingContext.cluster_B`` (the collator in training, the lmms-eval adapter and the capture in
evaluation). A learned cluster embedding T[c] (num_clusters x cluster_dim) enters the router:

gate ``token`` (default, LTDR's recipe): z_t = W x_t + V T[c_b(t)]; p_t = softmax(z_t); MoE-LLaVA's top-k
    (renormalised weights, its capacity options). T starts at 0 [ours], so an upcycled model routes
    exactly as its parent router at step 0 and learns what each cluster adds. No balance loss (LTDR): the
    record's aux_loss is the usual E * sum_e f_e P_e, for logging and for runs that add ``load_balance``.
gate ``sample_top1`` (MoCLE's): one gate per sample from the cluster alone, u_b = V T[c_b] / temperature
    (+ N(0, noise_std^2) in training), p_b = softmax(u_b), the top ``moe.top_k`` experts (MoCLE: 1) for
    every token of the sample, each weighted by its probability p_bi, not renormalised [ours: a
    renormalised top-1 weight is the constant 1 and would leave the gate without a gradient from the
    language-model loss]. T starts N(0, 1) [ours] so that clusters differ at step 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stgc.config import MoEConfig
from stgc.moe.record import RoutingContext, RoutingRecord
from stgc.moe.routers.base import Router, register_router
from stgc.moe.routers.softmax_topk import routed_record


def cluster_of_tokens(ctx: RoutingContext | None, num_tokens: int, device: torch.device) -> Tensor:
    """Each token's instruction cluster (T,) from ``RoutingContext.cluster_B``; a clear error without it."""
    if ctx is None or ctx.cluster_B is None:
        raise ValueError(
            "the mocle router needs each sample's instruction cluster (RoutingContext.cluster_B, or "
            "cluster_ids= in the model's forward): train through stgc.train (its collator adds them), "
            "evaluate through stgc eval / stgc analyze capture (they compute them with the checkpoint's "
            "instruction_clusters.json), or pass cluster_ids yourself."
        )
    cluster_B = ctx.cluster_B.reshape(-1).to(device=device, dtype=torch.long)
    B = cluster_B.numel()
    if B == 0 or num_tokens % B:
        raise ValueError(
            f"cluster_B has {B} entries for {num_tokens} tokens; give one cluster id per sample."
        )
    return cluster_B.repeat_interleave(num_tokens // B)


@register_router
class MoCLERouter(Router):
    """The cluster embedding joins the token router, or gates each sample alone (module docstring)."""

    name = "mocle"

    def __init__(self, moe: MoEConfig, hidden_size: int, layer_idx: int):
        super().__init__(moe, hidden_size, layer_idx)
        r = moe.router
        self.weight = nn.Linear(hidden_size, self.width, bias=False).weight
        self.cluster_embedding = nn.Parameter(torch.zeros(r.num_clusters, r.cluster_dim))
        self.cluster_weight = nn.Linear(r.cluster_dim, self.width, bias=False).weight
        self._init_clusters()

    @torch.no_grad()
    def _init_clusters(self) -> None:
        if self.moe.router.gate == "token":
            self.cluster_embedding.zero_()
        else:
            self.cluster_embedding.normal_()

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        super().init_weights(std)
        self._init_clusters()

    def logits(self, x_TD: Tensor) -> Tensor:
        """The token part W x (the cluster part is added in ``forward``)."""
        return torch.nn.functional.linear(x_TD.float(), self.weight.float())

    def forward(self, x_TD: Tensor, token_mask_T: Tensor, ctx: RoutingContext | None) -> RoutingRecord:
        r, T = self.moe.router, x_TD.shape[0]
        cluster_T = cluster_of_tokens(ctx, T, x_TD.device)
        # an id out of range is an internal error (the cluster model and the router share k: stgc.clusters
        # checks it); asserted on the device, without a host sync
        torch._assert_async(((cluster_T >= 0) & (cluster_T < r.num_clusters)).all())
        emb_TC = self.cluster_embedding.float()[cluster_T]
        cluster_TE = torch.nn.functional.linear(emb_TC, self.cluster_weight.float())
        if r.gate == "token":
            logits_TE = self.logits(x_TD) + cluster_TE
        else:
            logits_TE = cluster_TE / r.temperature
            if self.training and r.noise_std > 0:
                # one draw per sample (every token of a sample routes alike)
                B = ctx.cluster_B.numel()
                noise_BE = torch.randn(B, self.width, device=x_TD.device) * r.noise_std
                logits_TE = logits_TE + noise_BE.repeat_interleave(T // B, dim=0)
        return routed_record(
            self, logits_TE, token_mask_T, renormalise=r.gate == "token", extras={"cluster_T": cluster_T}
        )

    def extra_repr(self) -> str:
        r = self.moe.router
        return (
            f"D={self.hidden_size}, E={self.width}, K={self.moe.top_k}, clusters={r.num_clusters}, {r.gate}"
        )
