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


def test_every_bench_name_has_its_module():
    import importlib

    from stgc.bench.cli import BENCHMARKS

    for module, _ in BENCHMARKS.values():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.run)


def test_unknown_bench_name_is_refused(capsys):
    import pytest

    with pytest.raises(SystemExit) as err:
        main(["bench", "nope"])
    assert err.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_peak_memory_releases_the_previous_steps_gradients_first():
    """The blocks' and DeepSpeed's steps carry ``prepare`` (their gradients of the step before released),
    which ``peak_mib`` calls before it reads the base allocation, then the step once."""
    import torch

    from stgc.bench.deepspeed_ref import single_process_group
    from stgc.bench.moe import BenchConfig, _steps, peak_mib

    with single_process_group():
        steps = _steps(BenchConfig.quick("fp32"), 256, torch.device("cpu"))
    assert all(callable(getattr(steps[i], "prepare", None)) for i in ("stgc", "deepspeed_moellava"))
    events = []

    def step():
        events.append("step")

    step.prepare = lambda: events.append("prepare")
    peak_mib(step, torch.device("cpu"))
    assert events == ["prepare", "step"]
