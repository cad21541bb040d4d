"""The router protocol: a module that maps a layer's tokens (and what the routing context carries) to a
``RoutingRecord``. How the record's assignments become expert-sorted rows is the dispatch's job
(``stgc.moe.dispatch``); running the experts is the bank's (``stgc.moe.experts``)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from stgc.config import MoEConfig, RouterConfig
from stgc.moe.record import RoutingContext, RoutingRecord


class Router(nn.Module):
    """Base class of every router. Subclasses set ``name`` (the key of ``model.moe.router.name``) and
    implement ``forward``; the settings come from ``moe.router`` (a ``stgc.config.RouterConfig``).

    ``forward(x_TD, token_mask_T, ctx) -> RoutingRecord``: x_TD the layer's input tokens, token_mask_T the
    real tokens, ``ctx`` the forward's ``RoutingContext`` (or ``None``) with the extra inputs a router may
    read (modality codes, cluster ids). Routing at evaluation must be deterministic.

    Dense steps (``ctx.dense_layers``; CompeteSMoE's competition), where every expert runs on every token,
    need ``logits(x_TD)`` (computed before the experts run) and ``route_dense(logits_TR, outputs_TED,
    token_mask_T, ctx)``, the record chosen from the experts' outputs. Routers without them refuse dense
    steps.
    """

    name: ClassVar[str] = ""

    def __init__(self, moe: MoEConfig, hidden_size: int, layer_idx: int):
        super().__init__()
        self.moe, self.layer_idx, self.hidden_size = moe, layer_idx, hidden_size
        self.num_experts = moe.num_experts  # the bank's E (the router may be wider: ``width``)
        self.width = moe.router.width(moe.num_experts)

    @property
    def settings(self) -> RouterConfig:
        return self.moe.router

    def forward(
        self, x_TD: Tensor, token_mask_T: Tensor, ctx: RoutingContext | None
    ) -> RoutingRecord:  # pragma: no cover - abstract
        raise NotImplementedError

    def logits(self, x_TD: Tensor) -> Tensor:
        raise ValueError(f"router {self.name!r} cannot run dense steps (it has no logits of its own).")

    def route_dense(
        self, logits_TR: Tensor, outputs_TED: Tensor, token_mask_T: Tensor, ctx: RoutingContext | None
    ) -> RoutingRecord:
        raise ValueError(f"router {self.name!r} cannot run dense steps.")

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """A freshly built model's init (transformers' for an nn.Linear: normal(0, std) weights, zero
        biases); an upcycled router keeps nn.Linear's own init instead, as DeepSpeed's gate."""
        for name, param in self.named_parameters(recurse=False):
            if name == "bias":
                param.zero_()
            else:
                param.normal_(0.0, std)


ROUTERS: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    """Class decorator: register a router under ``cls.name`` (its settings class must be registered in
    ``stgc.config`` with ``register_router_config`` under the same name)."""
    if not cls.name or cls.name in ROUTERS:
        raise ValueError(f"router name {cls.name!r} is empty or registered twice")
    ROUTERS[cls.name] = cls
    return cls


def build_router(moe: MoEConfig, hidden_size: int, layer_idx: int) -> Router:
    name = moe.router.name
    if name not in ROUTERS:
        raise ValueError(
            f"moe.router.name={name!r} has no router class; valid routers are {sorted(ROUTERS)}."
        )
    return ROUTERS[name](moe, hidden_size, layer_idx)
