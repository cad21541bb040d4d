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
    """evals.run.evaluate_each's contract (one "load" per call, then each task's results.json written
    last into out_dir_of(task) and yielded) with made-up scores."""

    def __init__(self, interrupt_at: int | None = None, fail: tuple[str, str] | None = None):
        self.calls, self.loads, self.interrupt_at, self.fail = [], 0, interrupt_at, fail

    def __call__(
        self, checkpoint, tasks, *, out_dir_of, limit, batch_size, source, mini_root, model_args, gen_kwargs
    ):
        from evals.run import data_fingerprint
        from stgc.checkpoints import checkpoint_identity

        self.loads += 1
        for task in tasks:
            self.calls.append((Path(checkpoint).parent.name, task))
            out = Path(out_dir_of(task))
            out.mkdir(parents=True, exist_ok=True)
            (out / "samples_partial.jsonl").write_text("{}\n")  # what a killed run leaves behind
            if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
                raise KeyboardInterrupt
            if self.fail == (Path(checkpoint).parent.name, task):
                try:  # raised and caught, as evaluate_each does: the exception carries its traceback
                    raise RuntimeError("lmms-eval blew up\non two lines")
                except RuntimeError as err:
                    yield task, err
                continue
            value = zlib.crc32(f"{Path(checkpoint).parent.name}{task}".encode()) % 1000 / 1000
            metric = S.T.HEADLINE[task]
            results = {
                "results": {task: {f"{metric},none": value, f"{metric}_stderr,none": "N/A", "alias": task}},
                "versions": {task: 1.0},
                "n-samples": {task: {"original": 4, "effective": 4}},
                "stgc": {"checkpoint": str(checkpoint), **checkpoint_identity(checkpoint), "tasks": [task],
                         "source": source,
                         "data": data_fingerprint(source, mini_root), "limit": limit,
                         "gen_kwargs": gen_kwargs, "git_revision": "abc", "date": "2026-01-01"},
            }  # fmt: skip
            (out / "results.json").write_text(json.dumps(results))
            yield task, EvalResult(out, results)


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
    assert not (out / "constant_answer.csv").exists()  # a hand-made folder, not a generated suite
    assert json.loads((out / "sweep.json").read_text())["seeds"] == [0, 1]

    again = S.run_sweep(sweep, out, train_fn=StubTrainer(), evaluate_fn=FakeEvaluate(), progress=False)
    assert again.evaluated == []
    # other evaluation settings: every cell is redone
    changed = S.run_sweep(_sweep(tmp_path, mini, limit=2), out, train_fn=StubTrainer(),
                          evaluate_fn=FakeEvaluate(), progress=False)  # fmt: skip
    assert len(changed.evaluated) == 8


def test_a_generated_suite_gives_the_constant_answer_row(tmp_path):
    from stgc.data import generate_suite
    from stgc.logs import quiet_output

    with quiet_output():
        generate_suite(tmp_path / "mini", docs=8, train_size=20, image_size=64, benchmarks=["gqa", "mme"])
    sweep = _sweep(tmp_path, tmp_path / "mini")
    out = tmp_path / "results"
    result = S.run_sweep(sweep, out, train_fn=StubTrainer(), evaluate_fn=FakeEvaluate(), progress=False)
    constant = pd.read_csv(out / "constant_answer.csv")  # lmms-eval's scores of a fixed answer, this suite
    assert list(constant["task"]) == list(TASKS) and set(constant["constant_answer"]) == {"no", "yes"}
    assert result.constant == dict(zip(constant["task"], constant["score"]))
    row = (out / "table.md").read_text().splitlines()[4]
    assert row.startswith("| constant answer | – |") and f"{result.constant['stgc_mme']:.0f}" in row


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
    monkeypatch.setattr("evals.run.evaluate_each", FakeEvaluate())
    from stgc.cli import main

    assert main(["sweep", "t", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "2 cell(s) failed" in err and "baseline seed 1 stgc_gqa: training failed" in err
    assert main(["sweep", "nope"]) == 2
    err = capsys.readouterr().err  # the registry grows (peers): the names, sorted, after "valid sweeps"
    assert "unknown sweep 'nope'; valid sweeps: " in err and ", t, tiny" in err


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


def test_a_killed_checkpoint_keeps_its_finished_tasks(tmp_path, mini):
    sweep = _sweep(tmp_path, mini)
    out = tmp_path / "results"
    with pytest.raises(KeyboardInterrupt):  # killed during the 2nd task of baseline seed 1
        S.run_sweep(
            sweep, out, train_fn=StubTrainer(), evaluate_fn=FakeEvaluate(interrupt_at=4), progress=False
        )
    assert _cells(pd.read_csv(out / "scores.csv")) == {
        ("baseline", 0, "stgc_gqa"), ("baseline", 0, "stgc_mme"), ("baseline", 1, "stgc_gqa"),
    }  # fmt: skip
    evaluate = FakeEvaluate()
    S.run_sweep(sweep, out, train_fn=StubTrainer(), evaluate_fn=evaluate, progress=False)
    assert evaluate.calls[0] == ("baseline-seed1", "stgc_mme") and len(evaluate.calls) == 5
    assert evaluate.loads == 3  # one load per checkpoint with work left


def test_a_moved_tree_is_not_evaluated_again(tmp_path):
    """Fingerprints hold the data's content and relative paths: a tree copied elsewhere (suite, runs and
    results together) resumes as finished."""
    first = tmp_path / "a"
    write_tiny_suite(first / "mini", n=4, names=["gqa", "mme"])

    def sweep_in(root: Path) -> S.Sweep:
        return dataclasses.replace(_sweep(root, root / "mini"), runs_root=str(root / "runs"))

    S.run_sweep(sweep_in(first), first / "results", train_fn=StubTrainer(), evaluate_fn=FakeEvaluate(),
                progress=False)  # fmt: skip
    moved = tmp_path / "b"
    shutil.copytree(first, moved)
    shutil.rmtree(first)
    evaluate = FakeEvaluate()
    again = S.run_sweep(sweep_in(moved), moved / "results", train_fn=StubTrainer(), evaluate_fn=evaluate,
                        progress=False)  # fmt: skip
    assert again.evaluated == [] and evaluate.loads == 0 and len(again.scores) == 8


@pytest.mark.slow
def test_two_checkpoints_by_ten_tasks_load_each_model_once(tmp_path, monkeypatch):
    """The real evaluator (lmms-eval, the stgc_moe_llava model): 2 checkpoints x 10 tasks -> 2 loads, and
    every task's results.json in its own folder."""
    import evals.lmms_model as M

    mini = write_tiny_suite(tmp_path / "mini", n=2)
    loads = []
    init = M.StgcMoeLlava.__init__

    def counting_init(self, *args, **kwargs):
        loads.append(kwargs.get("pretrained"))
        init(self, *args, **kwargs)

    monkeypatch.setattr(M.StgcMoeLlava, "__init__", counting_init)
    source = write_tiny_checkpoint(tmp_path / "ckpt")
    from stgc.recipes import tiny

    sweep = S.Sweep(
        name="t",
        methods={"baseline": tiny()},
        seeds=(0, 1),
        tasks=S.T.SUITES[S.T.MOE_LLAVA],
        eval=S.EvalSettings(batch_size=4, mini_root=str(mini), limit=2, gen_kwargs="max_new_tokens=2"),
        runs_root=str(tmp_path / "runs"),
    )
    result = S.run_sweep(sweep, tmp_path / "results", train_fn=StubTrainer(source=source), progress=False)
    assert not result.failures, result.failures
    assert len(loads) == 2 and len(result.evaluated) == 20
    for seed in (0, 1):
        for task in sweep.tasks:
            path = (
                tmp_path / "runs" / f"baseline-seed{seed}" / "eval" / "checkpoint-3" / task / "results.json"
            )
            assert json.loads(path.read_text())["stgc"]["tasks"] == [task]
