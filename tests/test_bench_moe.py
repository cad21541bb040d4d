"""Smoke test of `stgc bench moe --quick` on a CPU: every implementation runs, the CSV has its columns."""

from __future__ import annotations

import csv

from stgc.bench.moe import COLUMNS, IMPLS
from stgc.cli import main


def test_bench_moe_quick_writes_csv(tmp_path, capsys):
    out = tmp_path / "moe.csv"
    assert main(["bench", "moe", "--quick", "--repeats", "1", "--dtype", "fp32", "--out", str(out)]) == 0
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == COLUMNS
    assert {(r["impl"], int(r["tokens"])) for r in rows} == {(i, t) for i in IMPLS for t in (256, 512)}
    for r in rows:
        assert float(r["fwd_bwd_ms"]) > 0
        if r["impl"] == "deepspeed_moellava":
            assert float(r["speedup_vs_deepspeed_moellava"]) == 1.0
        if r["impl"] == "floor":
            assert float(r["ratio_to_floor"]) == 1.0
    assert "deepspeed_nodrop" in capsys.readouterr().out


def test_bench_reserved_names(capsys):
    assert main(["bench", "capture"]) == 2
    assert "not available yet" in capsys.readouterr().out
