"""The peer methods' report section (analysis.peers, notebooks/05_peers.ipynb) on a synthetic results
folder: training diagnostics of CompeteSMoE / AdaMoE / MoMa / MoCLE runs and evaluation traces (AdaMoE with
null columns, MoMa groups, MoCLE with the prompts' clusters in the metadata)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from analysis import peers, report
from analysis.schema import traces_from_arrays, write_traces
from tests.test_report import make_results_folder

LAYERS = (0, 2)


def _runs(root: Path) -> Path:
    rng = np.random.default_rng(0)
    runs = root / "peer_runs"
    for method in ("competesmoe", "adamoe", "moma", "mocle"):
        lines = []
        for step in range(1, 21):
            r = {"step": step, "method": method, "loss/lm": 3.0 - 0.05 * step}
            if method == "competesmoe":
                r["competesmoe/competition_layers"] = float(step % 5 == 0)
                if step % 5 == 0:
                    r["competesmoe/agree_top1"] = 0.3 + 0.02 * step
                    r["competesmoe/overlap"] = 0.5 + 0.01 * step
            elif method == "adamoe":
                r["adamoe/true_experts_mean"] = 2.0 - 0.02 * step
                for j in range(4):
                    r[f"adamoe/true_k{j}"] = 0.25
            elif method == "moma":
                r["moma/image_imbalance"], r["moma/text_imbalance"] = 1.2, 1.1 + rng.random() / 10
            else:
                r["mocle/nmi"] = 0.01 * step
            lines.append(json.dumps(r))
        (runs / f"{method}-seed0").mkdir(parents=True)
        (runs / f"{method}-seed0" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return runs


def _trace(
    results: Path, root: Path, method: str, router: dict, K: int, R: int, extra_meta=None, relative=False
) -> None:
    rng = np.random.default_rng(1)
    ckpt = root / "ckpts" / method / "checkpoint-2"
    ckpt.mkdir(parents=True)
    config = {
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "model_type": "llama"},
        "moe": {"num_experts": 4, "router": router},
    }
    (ckpt / "config.json").write_text(json.dumps(config))
    n_samples, n_pos = 4, 6
    pieces = []
    for layer in LAYERS:
        sample = np.repeat([f"s{i}" for i in range(n_samples)], n_pos)
        modality = np.tile(np.array(["image"] * 3 + ["text"] * 3), n_samples)
        probs = rng.dirichlet(np.ones(R), len(sample))
        topk = np.argsort(-probs, axis=1)[:, :K]
        if method == "moma":  # image tokens in experts 0-1, text in 2-3
            topk = np.where(
                modality[:, None] == "image",
                rng.integers(0, 2, (len(sample), 1)),
                rng.integers(2, 4, (len(sample), 1)),
            )
        weights = np.where(topk < 4, 1.0, 0.0) / K
        pieces.append(
            traces_from_arrays(
                sample_id=sample,
                task="stgc_gqa",
                position=np.tile(np.arange(n_pos), n_samples),
                modality=modality,
                layer=layer,
                topk_experts_NK=topk,
                topk_weights_NK=weights,
                probs_NE=probs,
            )
        )
    meta = {
        "num_experts": R,
        "bank_experts": 4,
        "top_k": K,
        "moe_layers": list(LAYERS),
        # a sweep's traces name the checkpoint relative to the project folder (portable results)
        "checkpoint": str(ckpt.relative_to(root)) if relative else str(ckpt),
        "method": method,
        "seed": 0,
        **(extra_meta or {}),
    }
    write_traces(
        pd.concat(pieces, ignore_index=True), results / "routing" / f"{method}-seed0.parquet", meta=meta
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("peers")
    results = make_results_folder(root, traces=False, conflict=False, runs=False)
    _trace(results, root, "adamoe", {"name": "adamoe", "null_experts": 4}, 3, 8)
    _trace(results, root, "moma", {"name": "moma", "image_experts": 2}, 1, 4)
    clusters = {"stgc_gqa": {f"s{i}": i % 2 for i in range(4)}}
    _trace(results, root, "mocle", {"name": "mocle"}, 2, 4, {"instruction_clusters": clusters})
    return results, _runs(root)


def test_peers_section_tables_and_figures(folder):
    results, runs = folder
    section = peers.peers(results, runs)
    tables = {p.name for kind, v in section.items if kind == "table" for p in [v[2]]}
    assert {
        "peers_competition.csv",
        "peers_final.csv",
        "peers_true_experts.csv",
        "peers_group_loading.csv",
        "peers_cluster_nmi.csv",
    } <= tables
    figures = {p.name for p in section.figure_paths}
    assert {"peers_training_curves.png", "peers_true_experts_adamoe.png"} <= figures
    comp = pd.read_csv(results / "reports" / "tables" / "peers_competition.csv")
    assert comp["competition_steps"].tolist() == [4] and comp["steps"].tolist() == [20]
    loading = pd.read_csv(results / "reports" / "tables" / "peers_group_loading.csv")
    image = loading[loading["group"] == "image"]
    assert set(image["expert"]) == {0, 1} and image.groupby("layer")["share"].sum().round(6).eq(1).all()
    true = pd.read_csv(results / "reports" / "tables" / "peers_true_experts.csv")
    assert (true["true_experts_mean"] <= 3).all() and (true["gflops_per_token_mean"] > 0).all()
    nmi = pd.read_csv(results / "reports" / "tables" / "peers_cluster_nmi.csv")
    assert set(nmi["layer"]) == set(LAYERS) and nmi["nmi"].between(0, 1).all()


def test_a_checkpoint_named_relative_to_the_project_is_found_from_any_cwd(tmp_path, monkeypatch):
    # the report's kernel runs in notebooks/: the trace's relative checkpoint path is the project's
    results = make_results_folder(tmp_path, traces=False, conflict=False, runs=False)
    _trace(results, tmp_path, "adamoe", {"name": "adamoe", "null_experts": 4}, 3, 8, relative=True)
    elsewhere = tmp_path / "notebooks"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    section = peers.peers(results, _runs(tmp_path))
    assert "peers_true_experts_adamoe.png" in {p.name for p in section.figure_paths}
    # the same resolution names the trace by the sweep's label (every report section reads traces this way)
    from analysis.results import open_results
    from analysis.sections_routing import trace_files

    folder = open_results(results)
    checkpoint = (tmp_path / "ckpts" / "adamoe" / "checkpoint-2").resolve()
    (trace,) = trace_files(folder.trace_files(), {str(checkpoint): ("adamoe+stgc", 1)}, folder.resolve)
    assert (trace.checkpoint, trace.method, trace.seed) == (checkpoint, "adamoe+stgc", 1)


def test_true_experts_counts_only_bank_experts_that_ran():
    df = traces_from_arrays(
        sample_id=["a", "a"],
        task="t",
        position=[0, 1],
        modality=["image", "text"],
        layer=0,
        topk_experts_NK=np.array([[0, 5, 6], [1, 2, 7]]),
        topk_weights_NK=np.array([[1.0, 0, 0], [0.5, 0.5, 0]]),
        probs_NE=np.full((2, 8), 1 / 8),
    )
    hist = peers.true_experts(df, bank_experts=4)
    assert dict(zip(hist["modality"], hist["n_true"])) == {"image": 1, "text": 2}


def test_the_peers_notebook_is_thin_and_committed_without_outputs():
    # (test_report.test_full_report executes it headless with the other notebooks)
    assert "05_peers.ipynb" in report.NOTEBOOKS
    source = nbformat.read(report.NOTEBOOKS_DIR / "05_peers.ipynb", as_version=4)
    code = [c for c in source.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert "peers.peers(results_dir, runs_dir)" in code[-1].source
