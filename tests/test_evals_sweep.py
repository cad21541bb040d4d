"""Sweeps: resume after a kill without redoing finished cells, survive failing cells, and a real tiny sweep
(stub trainer, real lmms-eval evaluation)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import zlib
from pathlib import Path

import pandas as pd
import pytest

from evals import sweep as S
from evals.run import EvalResult
from evals.tables import LONG_COLUMNS
from evals.testing import write_tiny_checkpoint, write_tiny_suite

TASKS = ("stgc_gqa", "stgc_mme")


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return write_tiny_suite(tmp_path_factory.mktemp("mini"), n=4, names=["gqa", "mme"])


def _sweep(tmp_path: Path, mini: Path, **eval_changes) -> S.Sweep:
    from stgc.recipes import stgc_variant, tiny

    return S.Sweep(
        name="t",
        methods={"baseline": tiny(), "stgc": stgc_variant(tiny())},
        seeds=(0, 1),
        tasks=TASKS,
        eval=S.EvalSettings(batch_size=2, mini_root=str(mini), **eval_changes),
        runs_root=str(tmp_path / "runs"),
    )


class StubTrainer:
    """Records calls; returns <run folder>/checkpoint-3 and, like stgc.train.train, names it in the run's
    final.json; raises for the (method, seed) runs in `fail`."""

    def __init__(self, fail=(), source: Path | None = None):
        self.calls, self.fail, self.source = [], set(fail), source

    def __call__(self, config) -> Path:
        run = Path(config.output_dir)
        self.calls.append((run.name, config.training.seed))
        if run.name in self.fail:
            raise RuntimeError(f"stub training of {run.name} diverged")
        ckpt = run / "checkpoint-3"
        if self.source is not None and not ckpt.exists():
            shutil.copytree(self.source, ckpt)
        ckpt.mkdir(parents=True, exist_ok=True)
        (run / "final.json").write_text(json.dumps({"checkpoint": ckpt.name, "global_step": 3}))
        return ckpt


class FakeEvaluate:
    """evals.run.evaluate's contract (results.json written last into out_dir) with made-up scores."""

    def __init__(self, interrupt_at: int | None = None, fail: tuple[str, str] | None = None):
        self.calls, self.interrupt_at, self.fail = [], interrupt_at, fail

    def __call__(
        self, checkpoint, tasks, *, out_dir, limit, batch_size, source, mini_root, model_args, gen_kwargs
    ):
        self.calls.append((Path(checkpoint).parent.name, tasks[0]))
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples_partial.jsonl").write_text("{}\n")  # what a killed run leaves behind
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        if self.fail == (Path(checkpoint).parent.name, tasks[0]):
            raise RuntimeError("lmms-eval blew up\non two lines")
        task = tasks[0]
        from stgc.checkpoints import checkpoint_identity

        value = zlib.crc32(f"{checkpoint}{task}".encode()) % 1000 / 1000
        metric = S.T.HEADLINE[task]
        results = {
            "results": {task: {f"{metric},none": value, f"{metric}_stderr,none": "N/A", "alias": task}},
            "versions": {task: 1.0},
            "n-samples": {task: {"original": 4, "effective": 4}},
            "stgc": {"checkpoint": str(checkpoint), **checkpoint_identity(checkpoint), "tasks": [task],
                     "source": source,
                     "mini_root": str(mini_root), "limit": limit, "gen_kwargs": gen_kwargs,
                     "git_revision": "abc", "date": "2026-01-01"},
        }  # fmt: skip
        (out / "results.json").write_text(json.dumps(results))
        return EvalResult(out, results)


def _cells(scores: pd.DataFrame) -> set[tuple[str, int, str]]:
    return {(m, int(s), t) for m, s, t in scores[["method", "seed", "task"]].itertuples(index=False)}


def test_killed_sweep_resumes_without_redoing_finished_cells(tmp_path, mini):
    sweep = _sweep(tmp_path, mini)
    out = tmp_path / "results"
    with pytest.raises(KeyboardInterrupt):
        S.run_sweep(
            sweep, out, train_fn=StubTrainer(), evaluate_fn=FakeEvaluate(interrupt_at=5), progress=False
        )
    scores = pd.read_csv(out / "scores.csv")  # complete CSV of the four finished cells
    assert list(scores.columns) == [*LONG_COLUMNS, *S.PROVENANCE_COLUMNS]
    done = _cells(scores)
    assert len(done) == 4 and len(scores) == 4
    assert not list(out.glob(".*tmp"))

    trainer, evaluate = StubTrainer(), FakeEvaluate()
    result = S.run_sweep(sweep, out, train_fn=trainer, evaluate_fn=evaluate, progress=False)
    all_cells = {(m, s, t) for m in sweep.methods for s in sweep.seeds for t in TASKS}
    assert set(result.evaluated) == all_cells - done and len(evaluate.calls) == 4  # the killed cell redone
    assert trainer.calls == [("stgc-seed0", 0), ("stgc-seed1", 1)]  # finished (method, seed) not retrained
    assert _cells(pd.read_csv(out / "scores.csv")) == all_cells and not result.failures
    table = pd.read_csv(out / "table.csv")
    assert list(table["method"]) == ["baseline", "stgc"] and "stgc_mme [lmms-eval]" in table.columns
    assert json.loads((out / "sweep.json").read_text())["seeds"] == [0, 1]

    again = S.run_sweep(sweep, out, train_fn=StubTrainer(), evaluate_fn=FakeEvaluate(), progress=False)
    assert again.evaluated == []
    # other evaluation settings: every cell is redone
    changed = S.run_sweep(_sweep(tmp_path, mini, limit=2), out, train_fn=StubTrainer(),
                          evaluate_fn=FakeEvaluate(), progress=False)  # fmt: skip
    assert len(changed.evaluated) == 8


def test_failing_cells_are_named_and_the_others_finish(tmp_path, mini, monkeypatch, capsys):
    sweep = _sweep(tmp_path, mini)
    out = tmp_path / "results"
    trainer = StubTrainer(fail={"baseline-seed1"})
    evaluate = FakeEvaluate(fail=("stgc-seed0", "stgc_mme"))
    result = S.run_sweep(sweep, out, train_fn=trainer, evaluate_fn=evaluate, progress=False)
    failed = {(f.method, f.seed, f.task) for f in result.failures}
    assert failed == {("baseline", 1, "stgc_gqa"), ("baseline", 1, "stgc_mme"), ("stgc", 0, "stgc_mme")}
    assert trainer.calls.count(("baseline-seed1", 1)) == 1  # a failed training is not retried per task
    messages = {str(f) for f in result.failures}
    assert "stgc seed 0 stgc_mme: RuntimeError: lmms-eval blew up on two lines" in messages
    assert any(
        "training failed: RuntimeError: stub training of baseline-seed1 diverged" in m for m in messages
    )
    assert len(_cells(pd.read_csv(out / "scores.csv"))) == 5
    assert len(json.loads((out / "failures.json").read_text())) == 3
    assert (out / "logs" / "stgc-seed0-stgc_mme.log").read_text().startswith("Traceback")

    # the CLI exits non-zero and names the failures; a re-run only redoes the failed cells
    monkeypatch.setitem(S.SWEEPS, "t", lambda: sweep)
    monkeypatch.setattr(S, "_default_train", StubTrainer(fail={"baseline-seed1"}))
    monkeypatch.setattr("evals.run.evaluate", FakeEvaluate())
    from stgc.cli import main

    assert main(["sweep", "t", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "2 cell(s) failed" in err and "baseline seed 1 stgc_gqa: training failed" in err
    assert main(["sweep", "nope"]) == 2
    assert "unknown sweep 'nope'; valid sweeps: t, tiny" in capsys.readouterr().err


def test_tiny_sweep_end_to_end_with_lmms_eval(tmp_path, mini):
    source = write_tiny_checkpoint(tmp_path / "ckpt")
    sweep = dataclasses.replace(_sweep(tmp_path, mini, limit=2), tasks=("stgc_gqa",))
    result = S.run_sweep(sweep, tmp_path / "results", train_fn=StubTrainer(source=source), progress=False)
    assert not result.failures
    scores = pd.read_csv(tmp_path / "results" / "scores.csv")
    assert _cells(scores) == {(m, s, "stgc_gqa") for m in ("baseline", "stgc") for s in (0, 1)}
    assert (scores["n"] == 2).all() and (scores["task_version"] == "1.0/mini").all()
    assert scores["checkpoint"].str.endswith("checkpoint-3").all()
    table = pd.read_csv(tmp_path / "results" / "table.csv")
    assert list(table["method"]) == ["baseline", "stgc"] and "stgc_gqa p" in table.columns
    assert (
        tmp_path / "runs" / "stgc-seed1" / "eval" / "checkpoint-3" / "stgc_gqa" / "results.json"
    ).is_file()


def test_registry_and_definition_errors(tmp_path, mini):
    tiny = S.get_sweep("tiny")
    assert tiny.seeds == (0, 1) and set(tiny.methods) == {"baseline", "stgc"} and len(tiny.tasks) == 10
    assert tiny.run_config("stgc", 1).training.seed == 1
    assert tiny.run_config("stgc", 1).output_dir == str(Path("runs") / "tiny" / "stgc-seed1")
    with pytest.raises(ValueError, match="baseline 'base' is not one of its methods"):
        S.Sweep(name="x", methods={"a": None}, seeds=(0,), tasks=("stgc_gqa",), baseline="base")
    with pytest.raises(ValueError, match="unknown task"):
        S.Sweep(name="x", methods={"baseline": None}, seeds=(0,), tasks=("gqa",))
    from evals.run import EvalInputError

    with pytest.raises(EvalInputError, match="does not exist"):
        S.run_sweep(_sweep(tmp_path, tmp_path / "nothing"), tmp_path / "r", train_fn=StubTrainer(),
                    evaluate_fn=FakeEvaluate(), progress=False)  # fmt: skip
