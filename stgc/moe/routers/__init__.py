"""Routers, one module each, registered by name (``model.moe.router.name``; docs/extending.md)."""

from stgc.moe.routers import mole, softmax_topk  # noqa: F401  (registration)
from stgc.moe.routers.base import ROUTERS, Router, build_router, register_router

__all__ = ["ROUTERS", "Router", "build_router", "register_router"]
