"""The MoE layer as parts (docs/architecture.md, "The MoE layer"; docs/extending.md):

- ``record``: what routing produces (``RoutingRecord``), the token gradients an observer receives
  (``TokenGrads``) and the per-forward ``RoutingContext``;
- ``routers/``: routers behind one protocol, registered by name (``model.moe.router.name``);
- ``dispatch``: how assignments become expert-sorted rows and how the expert products are issued;
- ``experts/``: expert banks behind one protocol, registered by name (``model.moe.experts.name``); their
  eager forward is the readable specification;
- ``fused/``: the fast path (Triton routing, grouped products, fused STGC observer), registered for the
  (router, bank) pairs it supports;
- ``block``: the ``MoEBlock`` that puts them together in place of a decoder layer's MLP.
"""

from stgc.moe.block import MoEBlock
from stgc.moe.dispatch import EXPERT_PRODUCTS, use_grouped_mm
from stgc.moe.experts import EXPERT_BANKS, ExpertBank, FFNExperts
from stgc.moe.record import (
    FirstPass,
    GradObserver,
    RoutingContext,
    RoutingRecord,
    TokenGrads,
    routing_context,
)
from stgc.moe.routers import ROUTERS, Router
from stgc.moe.routers.fused_pairs import register_peer_pairs

register_peer_pairs()  # (after the fused package: it imports the routers)

__all__ = [
    "EXPERT_BANKS",
    "EXPERT_PRODUCTS",
    "ExpertBank",
    "FFNExperts",
    "FirstPass",
    "GradObserver",
    "MoEBlock",
    "ROUTERS",
    "Router",
    "RoutingContext",
    "RoutingRecord",
    "TokenGrads",
    "routing_context",
    "use_grouped_mm",
]
