"""Routing methods: a registry of small classes (``stgc.methods.base``). Importing this package registers
the built-in methods."""

from stgc.methods import baseline, stgc  # noqa: F401  (registration)
from stgc.methods.base import (
    REGISTRY,
    MethodConfig,
    RoutingMethod,
    StepLoss,
    build_method,
    method_config_from_dict,
    register,
)

__all__ = [
    "REGISTRY",
    "MethodConfig",
    "RoutingMethod",
    "StepLoss",
    "build_method",
    "method_config_from_dict",
    "register",
]
