"""The fused expert bank for the peer routers whose records the eager dispatch can sort (their routing
stays their own: ``stgc.moe.fused`` runs the router, sorts its assignments and runs the fused bank; null
columns sort past the last expert and are never computed). Each pair is held equal to the eager parts by
``tests/test_fast_paths.py``. Registered from ``stgc.moe``'s ``__init__``, once the fused package (which
imports the routers) is loaded."""

from __future__ import annotations


def register_peer_pairs() -> None:
    from stgc.moe.experts.ffn import FFNExperts
    from stgc.moe.fused import register_fused
    from stgc.moe.routers.adamoe import AdaMoERouter
    from stgc.moe.routers.competesmoe import CompeteSMoERouter
    from stgc.moe.routers.mocle import MoCLERouter
    from stgc.moe.routers.moma import MoMaRouter

    for router in (CompeteSMoERouter, AdaMoERouter, MoMaRouter, MoCLERouter):
        register_fused(router, FFNExperts)
