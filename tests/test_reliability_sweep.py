"""Issue 17, sweeps: a sweep counts only its runs' final checkpoints' results (step and content hash
recorded with each result); a result of another checkpoint is ignored, reported, and the cell evaluated on
the final checkpoint. The lock and the kills: test_fault_injection.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest

from evals import sweep as S
from evals.testing import write_tiny_suite
from tests.test_evals_sweep import FakeEvaluate, StubTrainer, _sweep


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return write_tiny_suite(tmp_path_factory.mktemp("mini"), n=4, names=["gqa", "mme"])


def _evaluate_elsewhere(checkpoint: Path, out_dir: Path, sweep: S.Sweep) -> None:
    """What `stgc eval <checkpoint> --out <out_dir>` leaves: results of `checkpoint` in `out_dir`."""
    from evals.tasks import resolve_source

    source, root = resolve_source(sweep.eval.source, sweep.eval.mini_root)
    list(FakeEvaluate()(
        checkpoint, ["stgc_gqa"], out_dir_of=lambda task: out_dir, limit=None, batch_size=2, source=source,
        mini_root=root, model_args={}, gen_kwargs=None,
    ))  # fmt: skip


def test_results_of_another_checkpoint_are_ignored_reported_and_redone(tmp_path, mini, monkeypatch, capsys):
    sweep = dataclasses.replace(_sweep(tmp_path, mini), seeds=(0,), tasks=("stgc_gqa",))
    out = tmp_path / "results"
    S.run_sweep(sweep, out, train_fn=StubTrainer(), evaluate_fn=FakeEvaluate(), progress=False)
    before = pd.read_csv(out / "scores.csv")
    assert list(before["checkpoint_step"]) == [3, 3] and before["checkpoint_hash"].notna().all()

    run = tmp_path / "runs" / "stgc-seed0"
    earlier = run / "checkpoint-1"
    earlier.mkdir()
    (earlier / "config.json").write_text(json.dumps({"model_type": "stgc_moe_llava", "step": 1}))
    # an evaluation of checkpoint-1 written into the final checkpoint's cell, and one into its own folder
    _evaluate_elsewhere(earlier, run / "eval" / "checkpoint-3" / "stgc_gqa", sweep)
    _evaluate_elsewhere(earlier, run / "eval" / "checkpoint-1" / "stgc_gqa", sweep)

    evaluate = FakeEvaluate()
    again = S.run_sweep(sweep, out, train_fn=StubTrainer(), evaluate_fn=evaluate, progress=False)
    assert again.evaluated == [("stgc", 0, "stgc_gqa")]  # redone on the final checkpoint
    assert evaluate.calls == [("stgc-seed0", "stgc_gqa")]
    assert len(again.ignored) == 2, again.ignored
    assert all("is not from the final checkpoint checkpoint-3" in line for line in again.ignored)
    assert any("stgc-seed0/eval/checkpoint-1/stgc_gqa (step 1," in line for line in again.ignored)
    after = pd.read_csv(out / "scores.csv")
    pd.testing.assert_frame_equal(after.drop(columns="date"), before.drop(columns="date"))
    table = pd.read_csv(out / "table.csv")
    assert len(table) == 2

    # the CLI names them; a results.json that records no checkpoint is not the final checkpoint's either
    cell = run / "eval" / "checkpoint-1" / "stgc_gqa" / "results.json"
    results = json.loads(cell.read_text())
    for key in S.PROVENANCE_COLUMNS:
        del results["stgc"][key]
    cell.write_text(json.dumps(results))
    monkeypatch.setitem(S.SWEEPS, "t", lambda: sweep)
    monkeypatch.setattr(S, "_default_train", StubTrainer())
    monkeypatch.setattr("evals.run.evaluate_each", FakeEvaluate())
    from stgc.cli import main

    assert main(["sweep", "t", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "1 result(s) not from their run's final checkpoint were ignored" in err
    assert "checkpoint-1/stgc_gqa (no checkpoint recorded) is not from the final checkpoint" in err


def test_an_unfinished_runs_results_are_not_counted(tmp_path, mini):
    """A result found for a run that has no final checkpoint yet (an evaluation of an intermediate
    checkpoint) is not a finished cell: the run is trained first and its final checkpoint evaluated."""
    sweep = dataclasses.replace(_sweep(tmp_path, mini), seeds=(0,), tasks=("stgc_gqa",), methods={
        "baseline": _sweep(tmp_path, mini).methods["baseline"]})  # fmt: skip
    intermediate = tmp_path / "runs" / "baseline-seed0" / "checkpoint-1"
    intermediate.mkdir(parents=True)
    _evaluate_elsewhere(intermediate, intermediate.parent / "eval" / "checkpoint-1" / "stgc_gqa", sweep)
    trainer = StubTrainer()
    result = S.run_sweep(
        sweep, tmp_path / "results", train_fn=trainer, evaluate_fn=FakeEvaluate(), progress=False
    )
    assert trainer.calls == [("baseline-seed0", 0)] and result.evaluated == [("baseline", 0, "stgc_gqa")]
    assert "has not finished" in result.ignored[0]
    assert list(pd.read_csv(tmp_path / "results" / "scores.csv")["checkpoint_step"]) == [3]
