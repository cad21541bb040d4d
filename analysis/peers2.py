"""Diagnostics of the peer methods II from a run's metrics.jsonl (figure -> function -> data): AGM's
modulation coefficients and scores per step, and the expert usage of a MoE run (LLaVA-MoLE's LoRA
experts, or any bank) per layer. Pure functions of the records; the figures take their tables.

    from analysis.peers2 import agm_curves, expert_usage, plot_agm, plot_expert_usage
    from stgc.train import read_metrics
    plot_agm(agm_curves(read_metrics("runs/tiny-agm-seed0")))
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

AGM_KEYS = ("kappa_I", "kappa_T", "s_I", "s_T", "sbar_I", "sbar_T")
_SHARE = re.compile(r"^routing/layer(\d+)/share_e(\d+)$")


def agm_curves(records: Sequence[dict[str, Any]]):
    """Long table (step, stat, value) of ``agm/<stat>`` for every logged step (stats: ``AGM_KEYS``)."""
    import pandas as pd

    rows = [
        {"step": r["step"], "stat": k, "value": float(r[f"agm/{k}"])}
        for r in records
        for k in AGM_KEYS
        if f"agm/{k}" in r
    ]
    if not rows:
        raise ValueError("no agm/* keys in these metrics: is this an AGM run (method.name=agm)?")
    return pd.DataFrame(rows, columns=["step", "stat", "value"])


def expert_usage(records: Sequence[dict[str, Any]], last: int | None = None):
    """Mean share of the real tokens' executed assignments per (layer, expert) over the run's steps (or
    its ``last`` steps): columns layer, expert, share (``routing/layer<i>/share_e<e>``)."""
    import pandas as pd

    chosen = list(records)[-last:] if last else list(records)
    rows = [
        {"layer": int(m.group(1)), "expert": int(m.group(2)), "share": float(v)}
        for r in chosen
        for k, v in r.items()
        if (m := _SHARE.match(k))
    ]
    if not rows:
        raise ValueError("no routing/layer<i>/share_e<e> keys in these metrics: is this a MoE run?")
    frame = pd.DataFrame(rows)
    return frame.groupby(["layer", "expert"], as_index=False)["share"].mean()


def plot_agm(curves):
    """kappa_I and kappa_T (log scale) and the scores s_I, s_T with their running means, per step."""
    import matplotlib.pyplot as plt

    fig, (ax_k, ax_s) = plt.subplots(1, 2, figsize=(10, 3.5))
    for stat in ("kappa_I", "kappa_T"):
        part = curves[curves["stat"] == stat]
        ax_k.plot(part["step"], part["value"], label=stat, lw=0.8)
    ax_k.set_yscale("log")
    ax_k.set(xlabel="step", ylabel="kappa", title="AGM modulation")
    for stat in ("s_I", "s_T", "sbar_I", "sbar_T"):
        part = curves[curves["stat"] == stat]
        ax_s.plot(part["step"], part["value"], label=stat, lw=0.8 if stat.startswith("s_") else 1.6)
    ax_s.set(xlabel="step", ylabel="CE of the Shapley response", title="AGM scores")
    for ax in (ax_k, ax_s):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_expert_usage(usage):
    """Heatmap of the expert shares per layer."""
    import matplotlib.pyplot as plt

    table = usage.pivot(index="layer", columns="expert", values="share")
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * table.shape[1], 1.0 + 0.4 * table.shape[0]))
    image = ax.imshow(table.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns])
    ax.set_yticks(range(table.shape[0]), [str(i) for i in table.index])
    ax.set(xlabel="expert", ylabel="MoE layer", title="expert usage (share of tokens)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig
