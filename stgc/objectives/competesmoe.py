"""CompeteSMoE (v2)'s competition: the schedule of competition steps and the losses of the competing layers
(Nguyen et al., "CompeteSMoE"; code Fsoft-AIC/CompeteSMoE, moe_model/model/moe/competesmoe.py;
docs/peers_routing.md). The competition itself (every expert runs; the top-k of the neural responses win)
is the ``competesmoe`` router's ``route_dense``; this objective tells the MoE blocks when to run it
(``context`` -> ``RoutingContext.dense_layers``) and adds, summed over the layers competing in the step:

    L_R   = MSE(p_t, sg softmax(s_t))                     (router distillation; mean over real tokens and E)
            + theta * MSE(p_t[S^C_t], sg softmax(s_t)[S^C_t])   (``hybrid``; mean over the k winners)
    L_div = mean over real tokens of sum_{i != j in S^C_t} cos(o_ti, o_tj) / k^2   (diversity)

with coefficients distill_coef and diversity_coef (0.01 each); the competition-side balance loss is the
competing layer's record ``aux_loss`` (the ``load_balance`` objective, alpha 0.01). Padding is excluded from
every mean; image and text tokens are treated alike. On a step with no competing layer there are no terms
(nothing is logged as 0).

Schedule: the first ``warmup`` share of the steps is router-only (it breaks the symmetry of upcycled
identical experts); after it each layer competes on a step with probability ``rate``; a step where more than
``max_layers`` layers would compete sends the extra layer to the nearest earlier step with room (that the
layer does not already compete on), else to the nearest later one. Drawn once, before training
(``prepare``), from the run's seed on rank 0 and broadcast, so that every rank runs the same layers densely
on the same steps; it is the objective's state, saved in every checkpoint and restored on resume.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stgc.config import MoEConfig
from stgc.moe.record import GradObserver, RoutingRecord
from stgc.objectives.base import Objective, register_objective
from stgc.objectives.config import CompeteSMoEConfig

ROUTER = "competesmoe"


def draw_schedule(
    max_steps: int, num_layers: int, *, warmup: float, rate: float, max_layers: int, seed: int
) -> Tensor:
    """Competition schedule, bool (max_steps, num_layers): True where the layer competes on that step (the
    module docstring's rule). Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    warm = int(warmup * max_steps)
    schedule = np.zeros((max_steps, num_layers), dtype=bool)
    load = np.zeros(max_steps, dtype=np.int64)
    for layer in range(num_layers):
        draws = rng.random(max_steps - warm) < rate
        for step in (warm + np.flatnonzero(draws)).tolist():
            free = (load < max_layers) & ~schedule[:, layer]
            free[:warm] = False
            if not free[step]:
                earlier = np.flatnonzero(free[:step])
                later = step + 1 + np.flatnonzero(free[step + 1 :])
                if len(earlier):
                    step = int(earlier[-1])
                elif len(later):
                    step = int(later[0])
                else:
                    continue  # every step is full: this draw is dropped
            schedule[step, layer] = True
            load[step] += 1
    return torch.from_numpy(schedule)


def _broadcast_from_rank0(t: Tensor) -> Tensor:
    """``t`` as rank 0 holds it, on every rank (a no-op without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    if torch.distributed.get_world_size() == 1:
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    if torch.distributed.get_backend() != "nccl":
        device = torch.device("cpu")
    buf = t.to(device=device, dtype=torch.uint8)
    torch.distributed.broadcast(buf, src=0)
    return buf.cpu().bool()


def competition_records(records: list[RoutingRecord]) -> list[RoutingRecord]:
    """The records of the layers that competed in this forward (``route_dense``'s)."""
    return [r for r in records if "responses_TE" in r.extras]


def distillation(record: RoutingRecord, hybrid: bool, theta: float) -> Tensor:
    """L_R of one competing layer (module docstring), fp32."""
    p_TE = record.probs_TE.float()
    q_TE = record.extras["responses_TE"].detach().float().softmax(-1)
    m_T = record.token_mask_T.to(p_TE.dtype)
    n = m_T.sum().clamp_min(1)
    loss = ((p_TE - q_TE).square().mean(-1) * m_T).sum() / n
    if hybrid:
        win = record.topk_idx_TK
        d_TK = p_TE.gather(1, win) - q_TE.gather(1, win)
        loss = loss + theta * (d_TK.square().mean(-1) * m_T).sum() / n
    return loss


def diversity(record: RoutingRecord) -> Tensor:
    """L_div of one competing layer (module docstring), fp32."""
    o_TKD = F.normalize(record.extras["winner_outputs_TKD"].float(), dim=-1)
    K = o_TKD.shape[1]
    cos_TKK = o_TKD @ o_TKD.transpose(1, 2)
    off_TKK = cos_TKK * (1 - torch.eye(K, device=cos_TKK.device, dtype=cos_TKK.dtype))
    m_T = record.token_mask_T.to(off_TKK.dtype)
    return (off_TKK.sum((1, 2)) / K**2 * m_T).sum() / m_T.sum().clamp_min(1)


@register_objective
class CompeteSMoE(Objective):
    """The competition schedule and losses (module docstring)."""

    name = "competesmoe"
    config: CompeteSMoEConfig

    def __init__(self, config: CompeteSMoEConfig, moe: MoEConfig) -> None:
        super().__init__(config, moe)
        self.schedule_SL: Tensor | None = None
        self.layers: tuple[int, ...] = ()

    def check(self, moe_layers: tuple[int, ...]) -> None:
        if self.moe.router.name != ROUTER:
            raise ValueError(
                f"the competesmoe objective needs model.moe.router.name={ROUTER!r} (its competition "
                f"chooses from the experts' outputs); this model's router is {self.moe.router.name!r}. Use "
                "method.name=competesmoe, which sets both."
            )

    def prepare(self, *, max_steps: int, moe_layers: tuple[int, ...], seed: int) -> None:
        c = self.config
        self.layers = tuple(sorted(moe_layers))
        schedule = draw_schedule(
            max_steps, len(self.layers), warmup=c.warmup, rate=c.rate, max_layers=c.max_layers, seed=seed
        )
        self.schedule_SL = _broadcast_from_rank0(schedule)

    def dense_layers(self, step: int) -> frozenset[int]:
        """The MoE layers (decoder-layer indices) that compete on optimizer step ``step``."""
        if self.schedule_SL is None:
            raise ValueError(
                "the competesmoe objective has no schedule: call prepare(max_steps=..., moe_layers=..., "
                "seed=...) before training (stgc.train does)."
            )
        if step >= self.schedule_SL.shape[0]:
            return frozenset()
        row = self.schedule_SL[step]
        return frozenset(self.layers[j] for j in row.nonzero().flatten().tolist())

    def context(self, step: int) -> dict[str, Any]:
        layers = self.dense_layers(step)
        return {"dense_layers": layers} if layers else {}

    def terms(self, records: list[RoutingRecord], step: int) -> dict[str, Tensor]:
        comp = competition_records(records)
        if not comp:
            return {}
        c = self.config
        return {
            "distill": sum(distillation(r, c.hybrid, c.theta) for r in comp),
            "diversity": sum(diversity(r) for r in comp),
        }

    def coefficients(self, step: int) -> dict[str, float]:
        return {"distill": self.config.distill_coef, "diversity": self.config.diversity_coef}

    def metrics(self, records: list[RoutingRecord], observer: GradObserver | None) -> dict[str, float]:
        """competesmoe/competition_layers (layers that competed in this forward; 0 on router-policy
        steps) and, on competition steps, the router's agreement with the competition over real tokens:
        agree_top1 (same top-1 expert) and overlap (|router top-k and winners| / k)."""
        comp = competition_records(records)
        out = {"competesmoe/competition_layers": float(len(comp))}
        if not comp:
            return out
        top1, overlap = [], []
        for r in comp:
            K = r.top_k
            mine_TK = torch.sort(r.probs_TE.detach(), dim=-1, descending=True, stable=True).indices[:, :K]
            win_TK = r.topk_idx_TK
            m_T = r.token_mask_T
            n = m_T.sum().clamp_min(1)
            top1.append(((mine_TK[:, 0] == win_TK[:, 0]) & m_T).sum() / n)
            shared_T = (mine_TK[:, :, None] == win_TK[:, None, :]).any(-1).sum(-1)
            overlap.append((shared_T * m_T).sum() / (n * K))
        out["competesmoe/agree_top1"] = float(torch.stack(top1).mean())
        out["competesmoe/overlap"] = float(torch.stack(overlap).mean())
        return out

    def state_dict(self) -> dict[str, Any]:
        if self.schedule_SL is None:
            return {}
        return {"schedule": self.schedule_SL.clone(), "layers": torch.tensor(self.layers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            raise ValueError(
                "the competesmoe objective's checkpoint state is empty; its schedule must be restored with "
                "the run (resume from a checkpoint written by this method)."
            )
        layers = tuple(int(i) for i in state["layers"].tolist())
        if self.layers and layers != self.layers:
            raise ValueError(
                f"the checkpoint's competition schedule is for MoE layers {list(layers)}, this model's are "
                f"{list(self.layers)}; resume with the same model."
            )
        self.layers, self.schedule_SL = layers, state["schedule"].bool().cpu()
