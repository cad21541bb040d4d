"""Smoke test of `stgc bench stgc --quick` (the real figures come from one H100: results/bench/stgc.csv)."""

import csv

from stgc.cli import main


def test_bench_stgc_quick_writes_every_mode(tmp_path):
    out = tmp_path / "stgc.csv"
    assert main(["bench", "stgc", "--quick", "--repeats", "1", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert {(r["suite"], r["mode"]) for r in rows} == {
        (s, m) for s in ("layers", "small") for m in ("baseline", "fused", "two_pass", "reference")
    }
    assert all(float(r["step_ms"]) > 0 for r in rows)
    assert all(float(r["time_overhead_pct"]) == 0 for r in rows if r["mode"] == "baseline")
