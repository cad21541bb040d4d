"""Routers, one module each, registered by name (``model.moe.router.name``; docs/extending.md)."""

# registration: MoE-LLaVA's router, LLaVA-MoLE's, then peer routing methods I
from stgc.moe.routers import adamoe, competesmoe, mocle, mole, moma, softmax_topk  # noqa: F401
from stgc.moe.routers.base import ROUTERS, Router, build_router, register_router

__all__ = ["ROUTERS", "Router", "build_router", "register_router"]
