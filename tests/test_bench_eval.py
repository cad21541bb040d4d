"""Smoke test of `stgc bench eval --quick` (real figures: results/bench/)."""

import csv

from stgc.cli import main


def test_bench_eval_quick(tmp_path):
    mini = tmp_path / "mini"
    out = tmp_path / "eval.csv"
    args = ["bench", "eval", "--quick", "--mini-root", str(mini), "--tasks", "stgc_gqa", "--out", str(out)]
    assert main(args) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 2 and all(int(r["samples"]) == 4 for r in rows)
    # batching must not change a single answer
    assert all(r["identical_answers"] == "True" for r in rows)
