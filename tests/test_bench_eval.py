"""Smoke tests of `stgc bench eval` and `stgc bench capture` --quick (real figures: results/bench/)."""

import csv

from stgc.cli import main


def test_bench_eval_and_capture_quick(tmp_path):
    mini = tmp_path / "mini"
    for bench in ("eval", "capture"):
        out = tmp_path / f"{bench}.csv"
        args = ["bench", bench, "--quick", "--mini-root", str(mini), "--tasks", "stgc_gqa", "--out", str(out)]
        assert main(args) == 0
        rows = list(csv.DictReader(open(out)))
        assert len(rows) == 2 and all(int(r["samples"]) == 4 for r in rows)
        # batching and capture must not change a single answer
        assert all(r["identical_answers"] == "True" for r in rows)
