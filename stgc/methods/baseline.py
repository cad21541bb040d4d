"""MoE-LLaVA's recipe: the language-model loss plus alpha * the load-balancing loss (alpha = 0.01)."""

from __future__ import annotations

from stgc.methods.base import RoutingMethod, register


@register
class Baseline(RoutingMethod):
    """L = L_lm + alpha * sum_layers L_aux (STGC.md section 1). Nothing beyond the base class."""

    name = "baseline"
