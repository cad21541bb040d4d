"""`stgc report` on a synthetic results folder: the four notebooks run headless and write .ipynb, .html, .png;
section functions on their own; missing inputs are said; a folder without scores.csv and a failing notebook
are errors naming the folder / the notebook."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from analysis import report, sections
from analysis.conflict_probe import write_conflict_scores
from analysis.results import ResultsError, find_runs, latest_results_dir, open_results
from analysis.schema import write_traces
from evals.tables import LONG_COLUMNS, wide_table, write_wide_csv
from tests.test_analysis_synthetic import make_traces

METHODS, SEEDS, LAYERS = ("baseline", "stgc"), (0, 1), (1, 3)
SCORES = {  # task -> (headline metric, baseline level, stgc gain)
    "stgc_gqa": ("exact_match", 0.42, 0.02),
    "stgc_scienceqa_img": ("exact_match", 0.61, 0.01),
    "stgc_mme": ("mme_perception_score", 1210.0, 15.0),
}
TRACE_TASKS = ("stgc_scienceqa_img", "stgc_textvqa_val")


def make_results_folder(root: Path, *, traces: bool = True, conflict: bool = True, runs: bool = True) -> Path:
    """results/synthetic/ with scores.csv, table.csv, sweep.json, routing/, conflict/ and runs/ whose
    metrics.jsonl holds conflict curves (STGC lower and falling)."""
    rng = np.random.default_rng(0)
    results = root / "results" / "synthetic"
    results.mkdir(parents=True)
    runs_root = root / "runs" / "synthetic"
    rows = []
    for method in METHODS:
        for seed in SEEDS:
            checkpoint = runs_root / f"{method}-seed{seed}" / "checkpoint-20"
            for task, (metric, level, gain) in SCORES.items():
                value = level + (gain if method == "stgc" else 0.0) + rng.normal(0, abs(level) * 0.01)
                for name, v in ((metric, value), ("extra_metric", 0.5)):
                    rows.append(
                        (
                            method,
                            seed,
                            str(checkpoint),
                            task,
                            "1.0/mini",
                            name,
                            v,
                            50,
                            "abc1234",
                            "2026-01-01",
                        )
                    )
    scores = pd.DataFrame(rows, columns=list(LONG_COLUMNS))
    scores.to_csv(results / "scores.csv", index=False)
    write_wide_csv(wide_table(scores, tasks=list(SCORES)), results / "table.csv")
    sweep = {
        "name": "synthetic",
        "methods": {m: {} for m in METHODS},
        "seeds": list(SEEDS),
        "baseline": "baseline",
    }
    (results / "sweep.json").write_text(json.dumps({**sweep, "runs_root": str(runs_root)}))
    for method in METHODS:
        for seed in SEEDS:
            checkpoint = runs_root / f"{method}-seed{seed}" / "checkpoint-20"
            if runs:
                lines = []
                for step in range(1, 21):
                    record = {"step": step, "method": method, "loss/lm": 3.0 - 0.05 * step}
                    drop = 0.01 * step if method == "stgc" else 0.002 * step
                    for layer in LAYERS:
                        fraction = 0.4 - drop + rng.normal(0, 0.01)
                        record[f"conflict/layer{layer}/fraction"] = fraction
                        record[f"conflict/layer{layer}/mean_cos"] = 0.5 - fraction + rng.normal(0, 0.01)
                    lines.append(json.dumps(record))
                checkpoint.mkdir(parents=True)
                (checkpoint.parent / "metrics.jsonl").write_text("\n".join(lines) + "\n")
            meta = {
                "num_experts": 4,
                "top_k": 2,
                "moe_layers": list(LAYERS),
                "checkpoint": str(checkpoint),
                "method": method,
                "seed": seed,
            }
            if traces:
                routing = "modality" if method == "stgc" else "random"
                table = pd.concat(
                    [
                        make_traces(
                            task=task, routing=routing, moe_layers=LAYERS, num_samples=3, seed=seed + i
                        )
                        for i, task in enumerate(TRACE_TASKS)
                    ],
                    ignore_index=True,
                )
                write_traces(table, results / "routing" / f"{method}-seed{seed}.parquet", meta=meta)
            if conflict:
                n = 400
                centre = 0.35 if method == "stgc" else 0.15
                score = np.clip(rng.normal(centre, 0.25, n), -1, 1).astype(np.float32)
                considered = rng.random(n) > 0.05
                frame = pd.DataFrame(
                    {
                        "batch": np.zeros(n, np.int32),
                        "sample_id": [f"s{i % 20}" for i in range(n)],
                        "position": np.arange(n, dtype=np.int32) // 2,
                        "modality": rng.choice(["image", "text", "answer"], n),
                        "layer": np.repeat(np.array(LAYERS, np.int16), n // 2),
                        "expert": rng.integers(0, 4, n).astype(np.int16),
                        "score": score,
                        "considered": considered,
                        "conflict": considered & (score < 0),
                    }
                )
                write_conflict_scores(frame, results / "conflict" / f"{method}-seed{seed}.parquet", meta=meta)
    return results


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    return make_results_folder(tmp_path_factory.mktemp("report"))


def test_full_report(results_dir):
    out = report.build_report(results_dir)
    assert out == results_dir / "reports"
    for name in report.NOTEBOOKS:
        executed = nbformat.read(out / name, as_version=4)
        assert executed.metadata["kernelspec"]["name"] == "python3"
        outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.get("output_type") == "error"]
        if (
            name == "05_peers.ipynb"
        ):  # no peer method in this folder (its figures: tests/test_peers_report.py)
            continue
        assert any("image/png" in o.get("data", {}) for o in outputs), name
        injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and str(results_dir) in injected[0].source
        html = (out / name).with_suffix(".html").read_text()
        assert "<img" in html and "Missing input" not in html, name
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert (
        "benchmarks.png" in figures
        and "conflict_curves.png" in figures
        and "cosine_histograms.png" in figures
    )
    for method in METHODS:  # one checkpoint (the smallest seed) per method and task
        for task in TRACE_TASKS:
            assert f"expert_loading_{method}_seed0_{task}.png" in figures
            assert f"pathways_{method}_seed0_{task}.png" in figures
    readme = (out / "README.md").read_text()
    assert "plot_expert_loading" in readme and "expert_loading_stgc_seed0_stgc_textvqa_val.png" in readme
    assert (out / "tables" / "routing_balance.csv").is_file()
    # the notebooks in the repository stay without outputs
    for name in report.NOTEBOOKS:
        source = nbformat.read(report.NOTEBOOKS_DIR / name, as_version=4)
        assert all(not c.get("outputs") for c in source.cells if c.cell_type == "code")
        assert source.metadata["kernelspec"]["name"] == "python3"


def test_sections_numbers(results_dir):
    bench = sections.benchmarks(results_dir)
    assert [p.name for p in bench.figure_paths] == ["benchmarks.png"]
    headline = sections.headline_scores(pd.read_csv(results_dir / "scores.csv"))
    assert set(headline["metric"]) == {"exact_match", "mme_perception_score"}

    loading = sections.expert_loading(results_dir)
    gap = pd.read_csv(results_dir / "reports" / "tables" / "modality_gap.csv")
    # "modality" routing sends image and text tokens to different first experts: a large gap, unlike random
    by_method = gap.groupby("method")["image_text_tv_mean"].mean()
    assert by_method["stgc"] > 0.4 > by_method["baseline"]
    assert not [n for n in loading.notes if sections.MISSING in n]

    conflict = sections.gradient_conflict(results_dir)
    final = pd.read_csv(results_dir / "reports" / "tables" / "conflict_final.csv")
    fraction = final[final["stat"] == "fraction"].groupby("method")["value_mean"].mean()
    assert fraction["stgc"] < fraction["baseline"]
    runs = find_runs(open_results(results_dir))
    assert len(runs) == 4 and set(runs["found_by"]) == {"sweep.json"}
    assert len(conflict.figure_paths) == 2


def test_missing_inputs_are_said(tmp_path):
    results = make_results_folder(tmp_path, traces=False, conflict=False, runs=False)
    for section in (
        sections.expert_loading(results),
        sections.pathways(results),
        sections.gradient_conflict(results),
    ):
        missing = [n for n in section.notes if n.startswith(sections.MISSING)]
        assert missing, section
        assert section.figure_paths == []
    notes = sections.gradient_conflict(results).notes
    assert any("no metrics.jsonl" in n for n in notes) and any("stgc analyze conflict" in n for n in notes)
    # runs found from scores.csv's checkpoint column when there is no sweep.json, or from --runs-dir
    (results / "sweep.json").unlink()
    assert set(find_runs(open_results(results))["found_by"]) == {"scores.csv"}


def test_results_folder_errors(tmp_path, capsys):
    empty = tmp_path / "results" / "empty"
    empty.mkdir(parents=True)
    with pytest.raises(ResultsError, match=f"{empty} has no scores.csv"):
        report.build_report(empty)
    with pytest.raises(ResultsError, match="no results folder with a scores.csv"):
        latest_results_dir(tmp_path / "results")
    from stgc.cli import main

    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no scores.csv" in err[0]
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_latest_results_dir(tmp_path):
    import os
    import time

    older = make_results_folder(tmp_path / "a", traces=False, conflict=False, runs=False)
    newer = older.parent / "newer"
    newer.mkdir()
    (newer / "scores.csv").write_text((older / "scores.csv").read_text())
    past = time.time() - 100
    os.utime(older / "scores.csv", (past, past))
    assert latest_results_dir(older.parent) == newer.resolve()


def test_failing_notebook_is_named(results_dir, tmp_path):
    book = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("results_dir = None", metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell("raise RuntimeError('deliberate failure')"),
        ],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )
    bad = tmp_path / "99_broken.ipynb"
    nbformat.write(book, bad)
    with pytest.raises(
        report.ReportError,
        match=r"99_broken.ipynb failed in cell \[3\] `raise Runt.*`: RuntimeError: deliberate failure",
    ):
        report.build_report(results_dir, notebooks=[bad])
    assert (results_dir / "reports.failed" / "99_broken.html").is_file()  # kept for reading the traceback
    assert not (results_dir / "reports" / "99_broken.html").exists()  # the report itself is unchanged


def test_notebook_runs_as_is_on_the_newest_results(tmp_path):
    """Opened and run without parameters (as in JupyterLab), a notebook finds results/ from its folder."""
    from nbclient import NotebookClient

    results = make_results_folder(tmp_path, traces=False, conflict=False, runs=False)
    book = nbformat.read(report.NOTEBOOKS_DIR / "01_benchmarks.ipynb", as_version=4)
    client = NotebookClient(
        book,
        timeout=300,
        kernel_name="python3",
        kernel_manager_class=report._kernel_manager_class(),
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    text = json.dumps([o for c in book.cells for o in c.get("outputs", [])])
    assert str(results.resolve()) in text and "image/png" in text
