"""Diagnostics of AdaMoE, MoMa and MoCLE-style clusters for ``metrics.jsonl`` (docs/peers_routing.md).
These objectives add no loss term: each method's routing is its router's (``stgc.moe.routers``), its
balance loss the router's ``aux_loss`` where it has one. Each reads the routing records of the step's
forward, over real tokens only (padding excluded), with image and text tokens apart where it says so."""

from __future__ import annotations

import math

import numpy as np
import torch

from stgc.moe.record import GradObserver, RoutingRecord
from stgc.objectives.base import Objective, register_objective

IMAGE_CODE = 1  # stgc.modeling.MODALITY_IMAGE (a test holds them equal)


def _check_router(objective: Objective, router: str) -> None:
    if objective.moe.router.name != router:
        raise ValueError(
            f"the {objective.name} objective reads the {router} router's records; this model's router is "
            f"{objective.moe.router.name!r}. Use method.name={objective.name}, which sets both."
        )


@register_objective
class AdaMoEDiagnostics(Objective):
    """AdaMoE: true experts per token and expert FLOPs per token.

    adamoe/true_experts_mean: executed true experts per (real token, MoE layer); adamoe/true_k{j}: the
    share of (token, layer) pairs with exactly j true experts (j = 0..k, the histogram);
    adamoe/{image,text}/true_experts_mean: the same by modality; adamoe/layer{i}/true_experts_mean;
    adamoe/flops_per_token_vs_dense: the experts' FLOPs per token as a multiple of one dense FFN's (each
    expert is a copy of it, so this is the mean number of true experts: k for the baseline, and what the
    null experts save)."""

    name = "adamoe"

    def check(self, moe_layers: tuple[int, ...]) -> None:
        _check_router(self, "adamoe")

    def metrics(self, records: list[RoutingRecord], observer: GradObserver | None) -> dict[str, float]:
        out: dict[str, float] = {}
        counts, modality = [], []
        for r in records:
            n_T = r.executed_TK().sum(-1)[r.token_mask_T]
            counts.append(n_T)
            out[f"adamoe/layer{r.layer_idx}/true_experts_mean"] = float(n_T.float().mean())
            if "modality_T" in r.extras:
                modality.append(r.extras["modality_T"][r.token_mask_T])
        if not counts:
            return out
        K = records[0].top_k
        n_N = torch.cat(counts).float()
        out["adamoe/true_experts_mean"] = float(n_N.mean())
        out["adamoe/flops_per_token_vs_dense"] = out["adamoe/true_experts_mean"]
        for j in range(K + 1):
            out[f"adamoe/true_k{j}"] = float((n_N == j).float().mean())
        if len(modality) == len(counts):
            image_N = torch.cat(modality) == IMAGE_CODE
            for name, sel in (("image", image_N), ("text", ~image_N)):
                if bool(sel.any()):
                    out[f"adamoe/{name}/true_experts_mean"] = float(n_N[sel].mean())
        return out


@register_objective
class MoMaDiagnostics(Objective):
    """MoMa: loading inside each modality group (specialisation by modality is perfect by construction,
    so only within-group figures are informative).

    moma/layer{i}/{image,text}_share_e{j}: expert j's share of its group's executed assignments;
    moma/layer{i}/{image,text}_imbalance: max / mean of the group's per-expert counts (1 = balanced);
    moma/{image,text}_imbalance: their means over layers; moma/cross_group: executed assignments of a
    token to the other modality's group (0 by construction: a check that the routing held)."""

    name = "moma"

    def check(self, moe_layers: tuple[int, ...]) -> None:
        _check_router(self, "moma")

    def metrics(self, records: list[RoutingRecord], observer: GradObserver | None) -> dict[str, float]:
        Gi = self.moe.router.image_experts
        out: dict[str, float] = {}
        imbalance: dict[str, list[float]] = {"image": [], "text": []}
        cross = 0
        for r in records:
            counts = r.tokens_per_expert_E.detach().float().cpu()
            for group, sl in (("image", slice(0, Gi)), ("text", slice(Gi, None))):
                c = counts[sl]
                total = float(c.sum())
                if total == 0:
                    continue
                for j, v in enumerate(c.tolist()):
                    out[f"moma/layer{r.layer_idx}/{group}_share_e{j}"] = v / total
                value = float(c.max() / c.mean())
                out[f"moma/layer{r.layer_idx}/{group}_imbalance"] = value
                imbalance[group].append(value)
            image_T = r.extras["modality_T"] == IMAGE_CODE
            in_image_TK = r.topk_idx_TK < Gi
            cross += int((r.executed_TK() & (in_image_TK != image_T[:, None])).sum())
        for group, values in imbalance.items():
            if values:
                out[f"moma/{group}_imbalance"] = sum(values) / len(values)
        out["moma/cross_group"] = float(cross)
        return out


def nmi_score(labels: np.ndarray, assigned: np.ndarray) -> float:
    """Normalised mutual information (arithmetic mean of the entropies, as sklearn's default and
    ``analysis.metrics.nmi``)."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(labels, assigned))


@register_objective
class MoCLEDiagnostics(Objective):
    """MoCLE: how much the instruction cluster decides the expert.

    mocle/layer{i}/nmi: NMI between each real token's instruction cluster and its top-1 expert, over the
    micro-batch; mocle/nmi: the mean over layers; mocle/clusters: distinct clusters in the micro-batch (a
    batch with one cluster has NMI 0 or undefined: read NMI over many steps, or from the traces)."""

    name = "mocle"

    def check(self, moe_layers: tuple[int, ...]) -> None:
        _check_router(self, "mocle")

    def metrics(self, records: list[RoutingRecord], observer: GradObserver | None) -> dict[str, float]:
        out: dict[str, float] = {}
        values = []
        for r in records:
            mask = r.token_mask_T.cpu().numpy()
            clusters = r.extras["cluster_T"].cpu().numpy()[mask]
            top1 = r.topk_idx_TK[:, 0].cpu().numpy()[mask]
            if len(clusters) == 0:
                continue
            value = nmi_score(clusters, top1)
            out[f"mocle/layer{r.layer_idx}/nmi"] = value
            values.append(value)
            out["mocle/clusters"] = float(len(np.unique(clusters)))
        if values:
            out["mocle/nmi"] = sum(values) / len(values) if not any(map(math.isnan, values)) else math.nan
        return out
