"""How an eager expert bank hands token gradients to an observer with plain autograd (docs/method.md,
"Token gradients").

The token gradients are activation gradients: g2 of assignment (t, e) is dL/d(expert e's output at t) and
g1 is dL/d(the activation the first bias is added to). Tensor hooks on those activations collect them in
the backward. The observer must run after every hook of the layer has fired and before the router's
backward, because what it returns is added to the router logits' gradient: ``_Observe`` is an identity on
the bank's input that also takes the logits, so its backward runs once the input's gradient is complete
(every expert's backward is done) and returns the observer's extra logit gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stgc.moe.record import GradObserver, RoutingRecord, TokenGrads


class TokenGradTap:
    """Collects one layer's token gradients from hooks and calls the observer with them once (with
    ``record``, which the bank sets before the backward)."""

    def __init__(self, observer: GradObserver, record: RoutingRecord | None = None):
        self.record, self.observer = record, observer
        self.sites: list[tuple[Tensor, Tensor, Tensor]] = []  # (expert_A, token_A, slot_A)
        self.g1: dict[int, Tensor] = {}
        self.g2: dict[int, Tensor] = {}

    def watch(
        self,
        expert_A: Tensor,
        token_A: Tensor,
        slot_A: Tensor,
        g1_site: Tensor,
        g2_site: Tensor,
        g1_index: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Rows ``token_A`` / ``slot_A`` of experts ``expert_A`` whose output (before the combine weight) is
        ``g2_site`` (rows in that order, any leading shape) and first-bias activation ``g1_site``: the same
        rows, or with ``g1_index`` = (index_0, index_1) the rows ``g1_site[index_0, index_1]`` of a larger
        tensor (every expert on every token)."""
        i = len(self.sites)
        self.sites.append((expert_A, token_A, slot_A))
        g1_site.register_hook(lambda g, i=i: self.g1.__setitem__(i, g if g1_index is None else g[g1_index]))
        g2_site.register_hook(lambda g, i=i: self.g2.__setitem__(i, g.reshape(-1, g.shape[-1])))

    def finish(self) -> Tensor | None:
        """The observer's extra logit gradient for this backward (``None`` if it returns none)."""
        if not getattr(self.observer, "active", True) or not self.sites:
            self.g1.clear(), self.g2.clear()
            return None
        r = self.record
        T, K = r.topk_idx_TK.shape
        dev = r.topk_idx_TK.device
        parts = [(s[0], s[1], s[2], self.g1.get(i), self.g2.get(i)) for i, s in enumerate(self.sites)]
        self.g1, self.g2 = {}, {}
        expert_A = torch.cat([p[0] for p in parts])
        token_A = torch.cat([p[1] for p in parts])
        order_A = token_A * K + torch.cat([p[2] for p in parts])
        g2 = [p[4] for p in parts]
        if any(g is None for g in g2):  # no gradient reached this layer's outputs
            return None
        g1 = [p[3].reshape(-1, p[3].shape[-1]) for p in parts]
        pos = torch.full((T * K,), -1, dtype=torch.long, device=dev)
        pos[order_A] = torch.arange(order_A.numel(), device=dev)
        grads = TokenGrads(
            g1_AF=torch.cat(g1).detach(),
            g2_AD=torch.cat(g2).detach(),
            expert_A=expert_A,
            token_A=token_A,
            order_A=order_A,
            pos_TK=pos.view(T, K),
            valid_TK=r.executed_TK(),
        )
        return self.observer(r, grads)


class _Observe(torch.autograd.Function):
    """Identity on ``x``; its backward runs after the bank's whole backward (see the module docstring) and
    returns the tap's extra gradient for ``logits``."""

    @staticmethod
    def forward(ctx, x: Tensor, logits: Tensor, tap: TokenGradTap) -> Tensor:
        ctx.tap = tap
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: Tensor):
        extra = ctx.tap.finish()
        return grad_x, extra, None


def observed_input(
    x_TD: Tensor, logits_TE: Tensor, observer: GradObserver | None
) -> tuple[Tensor, TokenGradTap | None]:
    """``x_TD`` routed through an observer's tap (and the tap, whose ``record`` the caller sets), or as it
    is without an observer or without gradients."""
    if observer is None or not torch.is_grad_enabled() or not logits_TE.requires_grad:
        return x_TD, None
    tap = TokenGradTap(observer)
    return _Observe.apply(x_TD, logits_TE, tap), tap
