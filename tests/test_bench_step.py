"""Smoke test of `stgc bench step --quick`: a row for the baseline, STGC fused and two_pass, and every method
preset of METHODS alone and with STGC (the real figures: one H200, results/bench/step.csv)."""

import csv

from stgc.bench.step import StepBench, build_bench_model
from stgc.cli import main
from stgc.objectives.config import METHODS


def test_bench_step_quick_has_a_row_for_every_method(tmp_path):
    out = tmp_path / "step.csv"
    assert main(["bench", "step", "--quick", "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    rows = {r["row"]: r for r in csv.DictReader(open(out))}
    expected = {"baseline", "stgc", "stgc_two_pass"}
    for name in METHODS:
        if name not in ("baseline", "stgc"):
            expected |= {name, f"{name}+stgc"}
    assert expected <= set(rows)
    assert {"competesmoe@dense", "competesmoe+stgc@dense"} <= set(rows)  # its competition steps
    assert all(float(r["step_ms"]) > 0 and float(r["tokens_per_s"]) > 0 for r in rows.values())
    assert float(rows["baseline"]["ratio_to_baseline"]) == 1.0
    assert rows["adamoe+stgc"]["stgc_overhead_pct"] != "" and rows["adamoe"]["stgc_overhead_pct"] == ""
    assert (
        rows["competesmoe"]["amortised_ratio"] != "" and int(rows["competesmoe@dense"]["dense_layers"]) >= 1
    )
    assert rows["adamoe"]["router"] == "adamoe" and rows["mocle"]["objectives"] == "mocle"


def test_the_full_size_model_builds_without_downloading():
    import torch

    model = build_bench_model(StepBench(), torch.device("meta"))
    n_params = sum(p.numel() for p in model.parameters())
    text = model.config.text_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (2048, 5632, 24)
    assert (
        model.config.moe_layers == tuple(range(0, 24, 2)) and 3.0e9 < n_params < 3.4e9
    )  # CLIP-L 0.3B + 1.6B LM with 4 experts in 12 layers
