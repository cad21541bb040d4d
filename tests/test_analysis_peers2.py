"""analysis.peers2: AGM curves and expert usage from metrics.jsonl records, and their figures."""

from __future__ import annotations

import pytest


def _records():
    return [
        {"step": 1, "agm/kappa_I": 0.5, "agm/kappa_T": 2.0, "agm/s_I": 1.0, "agm/s_T": 2.0,
         "routing/layer0/share_e0": 0.2, "routing/layer0/share_e1": 0.8, "routing/layer1/share_e0": 1.0},
        {"step": 2, "agm/kappa_I": 1.5, "agm/kappa_T": 0.7, "agm/s_I": 2.0, "agm/s_T": 1.0,
         "routing/layer0/share_e0": 0.4, "routing/layer0/share_e1": 0.6, "routing/layer1/share_e0": 1.0},
    ]  # fmt: skip


def test_tables_and_figures():
    import matplotlib

    matplotlib.use("Agg")
    from analysis.peers2 import agm_curves, expert_usage, plot_agm, plot_expert_usage

    curves = agm_curves(_records())
    kappa = curves[curves["stat"] == "kappa_T"]
    assert kappa["step"].tolist() == [1, 2] and kappa["value"].tolist() == [2.0, 0.7]
    usage = expert_usage(_records())
    assert usage.set_index(["layer", "expert"])["share"].to_dict() == pytest.approx(
        {(0, 0): 0.3, (0, 1): 0.7, (1, 0): 1.0}
    )
    assert expert_usage(_records(), last=1).set_index(["layer", "expert"])["share"][(0, 0)] == 0.4
    assert plot_agm(curves).axes[0].get_yscale() == "log"
    assert plot_expert_usage(usage).axes[0].get_xlabel() == "expert"
    with pytest.raises(ValueError, match="is this an AGM run"):
        agm_curves([{"step": 1}])
