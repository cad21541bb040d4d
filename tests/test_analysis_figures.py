"""Every figure builds from a synthetic table, saves, and labels its axes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from analysis import figures, metrics
from tests.test_analysis_synthetic import make_traces


def _check(fig: Figure, path) -> None:
    assert isinstance(fig, Figure)
    assert fig.get_suptitle()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert axes
    for ax in axes:
        assert ax.get_xlabel() and ax.get_title()
    assert any(ax.get_ylabel() for ax in axes)
    saved = figures.save_figure(fig, path)
    assert saved.exists() and saved.stat().st_size > 5_000


@pytest.mark.parametrize(("num_experts", "top_k", "num_image_tokens"), [(8, 1, 16), (4, 2, 576)])
@pytest.mark.parametrize("normalise", ["modality", "all"])
def test_expert_loading_figure(tmp_path, num_experts, top_k, num_image_tokens, normalise):
    traces = make_traces(
        num_experts=num_experts, top_k=top_k, num_image_tokens=num_image_tokens, moe_layers=(0, 2, 4)
    )
    loading = metrics.expert_loading(traces, num_experts)
    fig = figures.plot_expert_loading(loading, normalise=normalise)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 3
    _check(fig, tmp_path / "out" / "loading.png")
    with pytest.raises(ValueError, match="task"):
        figures.plot_expert_loading(pd.concat([loading, loading.assign(task="other")]))


def test_pathway_figure(tmp_path):
    traces = make_traces(num_experts=8, top_k=1, moe_layers=(1, 3, 5, 7))
    paths = metrics.top_paths(traces, top_n=6)
    _check(figures.plot_pathways(paths, modality="image"), tmp_path / "paths.png")
    with pytest.raises(ValueError, match="modality='video'"):
        figures.plot_pathways(paths, modality="video")


def _curves() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for method, level in (("baseline", 0.45), ("stgc", 0.3)):
        for seed in range(2):
            for step in range(0, 200, 20):
                for layer in (1, 3):
                    for stat, value in (("fraction", level), ("mean_cos", 0.6 - level)):
                        noisy = value + rng.normal(0, 0.01)
                        rows.append((f"{method}-{seed}", method, step, layer, f"layer{layer}", stat, noisy))
    rows.append(
        ("stgc-0", "stgc", 0, pd.NA, "all", "fraction", 0.3)
    )  # a layer-less key is left out of the means
    table = pd.DataFrame(rows, columns=["run", "method", "step", "layer", "scope", "stat", "value"])
    return table.astype({"layer": "Int64"})


def test_conflict_curve_figure(tmp_path):
    curves = _curves()
    _check(figures.plot_conflict_curves(curves), tmp_path / "curves.png")
    _check(figures.plot_conflict_curves(curves, stats=["fraction"], layer=3), tmp_path / "curves3.png")
    with pytest.raises(ValueError, match="layer=9"):
        figures.plot_conflict_curves(curves, layer=9)
    with pytest.raises(ValueError, match=r"stats \['norm'\]"):
        figures.plot_conflict_curves(curves, stats=["norm"])


@pytest.mark.parametrize("by", [("method",), ("method", "layer")])
def test_cosine_histogram_figure(tmp_path, by):
    rng = np.random.default_rng(0)
    scores = pd.DataFrame(
        {
            "method": np.repeat(["baseline", "stgc"], 400),
            "layer": np.tile([1, 3], 400),
            "score": rng.uniform(-1, 1, 800),
        }
    )
    hist = metrics.cosine_histogram(scores, by=by, bins=20)
    _check(figures.plot_cosine_histograms(hist), tmp_path / "hist.png")


def test_benchmark_figure(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        (method, seed, task, metric, base + rng.normal(0, 0.5))
        for method in ("baseline", "stgc")
        for seed in range(3)
        for task, metric, base in (("gqa", "exact_match", 60.0), ("mme", "mme_perception_score", 1400.0))
    ]
    rows.append(("single-seed-peer", 0, "gqa", "exact_match", 59.0))  # one seed: no error bar, still drawn
    scores = pd.DataFrame(rows, columns=["method", "seed", "task", "metric", "value"])
    _check(figures.plot_benchmark_comparison(scores), tmp_path / "bench.pdf")
    with pytest.raises(ValueError, match="missing from method_order"):
        figures.plot_benchmark_comparison(scores, method_order=["baseline"])
    with pytest.raises(ValueError, match="non-finite"):
        figures.plot_benchmark_comparison(scores.assign(value=np.nan))
    with pytest.raises(ValueError, match="no suffix"):
        figures.save_figure(figures.plot_benchmark_comparison(scores), tmp_path / "bench")
