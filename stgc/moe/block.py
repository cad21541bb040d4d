"""The MoE block: a router and an expert bank in place of a decoder layer's MLP (docs/architecture.md,
"The MoE layer"). Which router and bank a layer has comes from ``MoEConfig`` (saved in the checkpoint);
which implementation runs them is chosen once, here, when the block is built: the fused fast path where
one is registered for the pair (``stgc.moe.fused``), else the eager parts themselves."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stgc.config import MoEConfig
from stgc.moe import fused
from stgc.moe.experts import ExpertBank, build_experts
from stgc.moe.experts.observe import observed_input
from stgc.moe.record import RoutingContext, RoutingRecord
from stgc.moe.routers import Router, build_router


class MoEBlock(nn.Module):
    """A drop-in replacement for a decoder layer's MLP: ``forward(hidden_states_BSD) -> hidden_states_BSD``.

    router / experts: the parts (``model.moe.router`` / ``model.moe.experts``). implementation: "fused" or
    "eager" (``MoEConfig.implementation``; "auto" picks "fused" where the pair is registered). The fused
    path's own knobs, for benchmarks and tests: ``expert_products`` (``stgc.moe.dispatch.EXPERT_PRODUCTS``)
    and ``use_triton`` (False: its plain-torch passes). At evaluation routing is deterministic and the
    block keeps no state between calls.
    """

    def __init__(self, config: MoEConfig, hidden_size: int, intermediate_size: int, ffn: str, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.router: Router = build_router(config, hidden_size, layer_idx)
        self.experts: ExpertBank = build_experts(config, hidden_size, intermediate_size, ffn)
        fusable = fused.supports(self.router, self.experts)
        self.implementation = "fused" if config.implementation == "auto" and fusable else "eager"
        self.routing_ctx: RoutingContext | None = None
        self.expert_products = "auto"
        self.use_triton = True

    def forward(self, hidden_states: Tensor) -> Tensor:
        ctx = self.routing_ctx
        if ctx is not None and ctx.input_hook is not None:
            hidden_states = ctx.input_hook(self.layer_idx, hidden_states, ctx)
        shape = hidden_states.shape
        x_TD = hidden_states.reshape(-1, shape[-1])
        token_mask_T = self._token_mask(ctx, x_TD)
        injected = (
            None if ctx is None or ctx.injected_biases is None else ctx.injected_biases.get(self.layer_idx)
        )
        if ctx is not None and ctx.dense_layers and self.layer_idx in ctx.dense_layers:
            record, y_TD = self._dense_forward(x_TD, token_mask_T, ctx)
        elif self.implementation == "fused" and injected is None:
            record, y_TD = fused.fused_forward(self, x_TD, token_mask_T, ctx)
        else:
            record, y_TD = self._eager_forward(x_TD, token_mask_T, ctx, injected)
        record.batch_size = shape[0] if len(shape) == 3 else None
        if ctx is not None and ctx.records is not None:
            ctx.records.append(record)
        return y_TD.reshape(shape)

    def _token_mask(self, ctx: RoutingContext | None, x_TD: Tensor) -> Tensor | None:
        if ctx is None or ctx.token_mask_BT is None:
            return None
        token_mask_T = ctx.token_mask_BT.reshape(-1).to(device=x_TD.device, dtype=torch.bool)
        if token_mask_T.numel() != x_TD.shape[0]:
            raise ValueError(
                f"routing context token mask has {token_mask_T.numel()} entries for {x_TD.shape[0]} "
                "tokens; pass the mask of this forward's tokens (attention_mask[:, -seq_len:])."
            )
        return token_mask_T

    @staticmethod
    def _all_real(x_TD: Tensor, token_mask_T: Tensor | None) -> Tensor:
        if token_mask_T is not None:
            return token_mask_T
        return torch.ones(x_TD.shape[0], dtype=torch.bool, device=x_TD.device)

    def _eager_forward(
        self,
        x_TD: Tensor,
        token_mask_T: Tensor | None,
        ctx: RoutingContext | None,
        biases: tuple[Tensor, Tensor] | None,
    ) -> tuple[RoutingRecord, Tensor]:
        """The specification: the router's record, then the bank over its executed assignments."""
        record = self.router(x_TD, self._all_real(x_TD, token_mask_T), ctx)
        observer = ctx.observer if ctx is not None else None
        return record, self.experts(x_TD, record, observer, biases)

    def _dense_forward(
        self, x_TD: Tensor, token_mask_T: Tensor | None, ctx: RoutingContext
    ) -> tuple[RoutingRecord, Tensor]:
        """A step on which every expert runs on every token (``ctx.dense_layers``): the router chooses
        from the experts' outputs (``Router.route_dense``); the token gradients of the executed
        assignments go to the observer as on any step."""
        token_mask_T = self._all_real(x_TD, token_mask_T)
        logits_TR = self.router.logits(x_TD)
        # (the observer's tap takes the logits before the experts run; the record comes after them)
        x_in, tap = observed_input(x_TD, logits_TR, ctx.observer)
        dense = self.experts.dense(x_in)
        record = self.router.route_dense(logits_TR, dense.outputs_TED, token_mask_T, ctx)
        T, K = record.topk_idx_TK.shape
        E = self.experts.num_experts
        idx_TK = record.topk_idx_TK.clamp_max(E - 1)
        o_TKD = dense.outputs_TED.gather(1, idx_TK[..., None].expand(T, K, dense.outputs_TED.shape[-1]))
        w_TK = torch.where(record.kept_TK, record.weights_TK, 0.0)
        y_TD = (o_TKD * w_TK[..., None].to(o_TKD.dtype)).sum(1)
        if tap is not None:
            tap.record = record
            token_A = torch.arange(T, device=x_TD.device).repeat_interleave(K)
            slot_A = torch.arange(K, device=x_TD.device).repeat(T)
            tap.watch(
                idx_TK.reshape(-1),
                token_A,
                slot_A,
                dense.site1_TEF,
                o_TKD,
                g1_index=(token_A, idx_TK.reshape(-1)),
            )
        return record, y_TD

    @classmethod
    def upcycled(cls, config: MoEConfig, mlp: nn.Module, ffn: str, layer_idx: int) -> MoEBlock:
        """Sparse upcycling of a dense MLP (gate/up/down or fc1/fc2, nn.Linear layout): the bank is built
        from it (every expert a copy, for the FFN bank), in its dtype; the router stays fp32 with
        nn.Linear's default init (as DeepSpeed's gate, which MoE-LLaVA adds to a loaded model)."""
        first = mlp.gate_proj if ffn == "swiglu" else mlp.fc1
        F_, D = first.weight.shape
        block = cls(config, D, F_, ffn, layer_idx).to(first.weight.dtype)
        block.experts.upcycle(mlp)
        block.router.float()
        return block

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, implementation={self.implementation}"
