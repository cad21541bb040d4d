"""Sweeps: methods x seeds x tasks, trained where missing, evaluated, tabulated; resumable.

A sweep is defined like a recipe: a Python function returning a `Sweep` (registry `SWEEPS`; `tiny` is the
embedded default: baseline vs STGC on the tiny recipe, 2 seeds, the ten mini benchmarks). Variants derive
in code (`dataclasses.replace`), never by copying a file. `Sweep`, `EvalSettings` and the registry are in
`evals.sweep_registry` (importable from here); this module runs a sweep.

`run_sweep(sweep, out)` runs the grid of cells (method, seed, task) in two phases, each with one progress
bar (stgc.logs):
- training: `train(config) -> checkpoint` once per (method, seed) that has a cell left to do, with the
  method's RunConfig, the seed set and the run folder `<runs_root>/<method>-seed<seed>` (default
  runs_root: `runs/<sweep>`). The default trainer is `stgc.train.train` (imported when first needed),
  which skips a finished run and resumes a partial one; tests inject a stub.
- evaluation: one model load per checkpoint (`evals.run.evaluate_each`): lmms-eval evaluates its tasks in
  turn on the loaded model, each task into `<run folder>/eval/<checkpoint>/<task>/`, written as soon as
  that task is done. A cell is finished when its run has finished (final.json names the final
  checkpoint), that checkpoint's folder holds a results.json produced with the sweep's evaluation
  settings (the source, the data (the mini suite's content hash, not its path: a moved or copied tree is
  not evaluated again), limit and gen_kwargs), and the results record that very checkpoint (step and
  content hash, `stgc.checkpoints.checkpoint_identity`). Finished cells are skipped (their run not even
  trained); partial ones (no results.json: killed or failed) are redone. Results of any other checkpoint
  (an earlier one, or a re-trained run's old weights) are ignored, named in `SweepResult.ignored` (the CLI
  prints them), and the cell is evaluated on the final checkpoint.
- one sweep at a time writes `<out>` (`stgc.runlock`): a second one stops at once naming the first; each
  run folder has its own lock, taken by `train`.
- a failing cell is recorded and the others go on (a checkpoint that does not load fails its cells); the
  failures are named at the end (and in `<out>/failures.json`), and `run_sweep` reports them (the CLI
  exits non-zero).
After every cell `<out>/scores.csv` (long, with provenance: evals.tables.LONG_COLUMNS, then
`PROVENANCE_COLUMNS`, the checkpoint's step and content hash) is rewritten
atomically from all finished cells, so a killed sweep leaves a complete CSV of what finished; at the end
`<out>/table.csv` (wide; evals.tables) and `<out>/sweep.json` (the resolved definition) are written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evals import tasks as T
from evals.sweep_registry import SWEEPS, EvalSettings, Sweep, get_sweep, peers_sweep, tiny_sweep
from stgc.paths import portable

if TYPE_CHECKING:  # pandas is imported when a sweep runs, so that `stgc sweep --help` stays instant
    import pandas as pd

SCORES_NAME, TABLE_NAME, SWEEP_NAME, FAILURES_NAME = "scores.csv", "table.csv", "sweep.json", "failures.json"
PROVENANCE_COLUMNS = ("checkpoint_step", "checkpoint_hash")  # after LONG_COLUMNS in scores.csv
TABLE_MD_NAME = "table.md"


@dataclasses.dataclass
class Failure:
    method: str
    seed: int
    task: str
    error: str

    def __str__(self) -> str:
        return f"{self.method} seed {self.seed} {self.task}: {self.error}"


@dataclasses.dataclass
class SweepResult:
    out_dir: Path
    scores: pd.DataFrame
    table: pd.DataFrame | None
    failures: list[Failure]
    evaluated: list[tuple[str, int, str]]  # cells evaluated by this call (the others were finished)
    ignored: list[str] = dataclasses.field(default_factory=list)  # results not from the final checkpoint
    constant: dict[str, float] = dataclasses.field(default_factory=dict)  # task -> constant answer's score


# ---------------------------------------------------------------------------------------------- runner


def _eval_fingerprint(sweep: Sweep, source: str, root: Path) -> dict[str, Any]:
    """What a finished cell's results.json must match to be kept: the data by content, never by path."""
    from evals.run import data_fingerprint

    return {
        "source": source,
        "data": data_fingerprint(source, root),
        "limit": sweep.eval.limit,
        "gen_kwargs": sweep.eval.gen_kwargs,
    }


def _finished(results: dict[str, Any] | None, task: str, fingerprint: dict[str, Any]) -> bool:
    if not results or "stgc" not in results:
        return False
    info = results["stgc"]
    return info.get("tasks") == [task] and all(info.get(k) == v for k, v in fingerprint.items())


def _identity(results: dict[str, Any]) -> dict[str, Any]:
    info = results.get("stgc", {})
    return {k: info.get(k) for k in PROVENANCE_COLUMNS}


def _not_final(results: dict[str, Any], where: Path, final: Path) -> str | None:
    """Why results found for a cell are not its run's final checkpoint's (None when they are)."""
    from stgc.checkpoints import checkpoint_identity

    got, want = _identity(results), checkpoint_identity(final)
    if got == want:
        return None
    found = f"step {got['checkpoint_step']}, hash {got['checkpoint_hash']}" if got["checkpoint_hash"] else (
        "no checkpoint recorded"
    )  # fmt: skip
    return (
        f"{where} ({found}) is not from the final checkpoint {final.name} (step {want['checkpoint_step']}, "
        f"hash {want['checkpoint_hash']})"
    )


def _write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _default_train(config: Any) -> Path:
    from stgc.train import train  # imported on first use: it loads transformers' Trainer and DeepSpeed

    return train(config)


def _sweep_dict(sweep: Sweep, source: str, root: Path) -> dict[str, Any]:
    methods = {
        label: (cfg.to_dict() if hasattr(cfg, "to_dict") else repr(cfg))
        for label, cfg in sweep.methods.items()
    }
    return {
        "name": sweep.name,
        "methods": methods,
        "seeds": list(sweep.seeds),
        "tasks": list(sweep.tasks),
        "baseline": sweep.baseline,
        "eval": {**dataclasses.asdict(sweep.eval), "source": source, "mini_root": portable(root)},
        "runs_root": portable(sweep.run_dir(sweep.baseline, sweep.seeds[0]).parent),
        "protocols": {t: T.PROTOCOLS[t] for t in sweep.tasks},
    }


def run_sweep(
    sweep: Sweep,
    out_dir: str | os.PathLike | None = None,
    *,
    train_fn: Callable[[Any], Path] | None = None,
    evaluate_fn: Callable[..., Any] | None = None,
    progress: bool = True,
) -> SweepResult:
    """Run (or resume) `sweep`; see the module docstring. `train_fn(config) -> checkpoint folder` defaults to
    stgc.train.train; `evaluate_fn` to evals.run.evaluate_each (both injectable for tests). Raises
    `stgc.runlock.FolderLockedError` at once when another sweep is writing the results folder."""
    from stgc.runlock import folder_lock

    out = Path(out_dir) if out_dir is not None else Path("results") / sweep.name
    with folder_lock(out, "sweep"):
        return _run_sweep(sweep, out, train_fn=train_fn, evaluate_fn=evaluate_fn, progress=progress)


def _run_sweep(
    sweep: Sweep,
    out: Path,
    *,
    train_fn: Callable[[Any], Path] | None,
    evaluate_fn: Callable[..., Any] | None,
    progress: bool,
) -> SweepResult:
    """run_sweep's body, under the results folder's lock."""
    import pandas as pd

    from evals.run import scores_from_results
    from evals.tables import LONG_COLUMNS, wide_table, write_wide_csv

    if evaluate_fn is None:
        from evals.run import evaluate_each as evaluate_fn
    default_trainer = train_fn is None
    train_fn = train_fn or _default_train
    out.mkdir(parents=True, exist_ok=True)
    source, root = T.resolve_source(sweep.eval.source, sweep.eval.mini_root)
    if source == "mini":  # a missing or broken dataset folder would fail every cell: say so once, up front
        from evals.run import check_mini_folder

        for bench in T.benchmarks_of(list(sweep.tasks)):
            check_mini_folder(root, bench)
    fingerprint = _eval_fingerprint(sweep, source, root)
    _write_text_atomic(
        out / SWEEP_NAME, json.dumps(_sweep_dict(sweep, source, root), indent=2, default=str) + "\n"
    )

    cells = [(m, s, t) for m in sweep.methods for s in sweep.seeds for t in sweep.tasks]
    finished: dict[tuple[str, int, str], dict[str, Any]] = {}
    todo: dict[tuple[str, int], list[str]] = {}
    ignored: list[str] = []
    for method, seed, task in cells:
        results = _final_results(sweep, method, seed, task, fingerprint, ignored)
        if results is not None:
            finished[(method, seed, task)] = results
        else:
            todo.setdefault((method, seed), []).append(task)
    failures: list[Failure] = []
    evaluated: list[tuple[str, int, str]] = []

    def write_scores() -> pd.DataFrame:
        frames = [
            scores_from_results(finished[c], method=c[0], seed=c[1]).assign(**_identity(finished[c]))
            for c in cells
            if c in finished
        ]
        columns = [*LONG_COLUMNS, *PROVENANCE_COLUMNS]
        scores = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
        _write_csv_atomic(scores, out / SCORES_NAME)
        return scores

    def fail(method: str, seed: int, task: str, err: BaseException, message: str | None = None) -> None:
        failures.append(Failure(method, seed, task, message or _one_line(err)))
        _log_failure(out, method, seed, task, err)

    # phase 1: train every run that has a cell left (a finished run returns its checkpoint at once)
    checkpoints: dict[tuple[str, int], Path] = {}
    train_errors: dict[tuple[str, int], BaseException] = {}
    configs = {run: sweep.run_config(*run) for run in todo}
    with _training_phase(configs, default_trainer, progress) as on_run_done:
        from stgc.logs import quiet_output

        for run, config in configs.items():
            try:
                with quiet_output():  # what a run prints (its parameter count) shows with --verbose
                    checkpoints[run] = Path(train_fn(config))
            except Exception as err:  # the run's cells fail; the other runs go on (KeyboardInterrupt stops)
                train_errors[run] = err
            on_run_done(run)

    # phase 2: evaluate, one model load per checkpoint, each task written as soon as it is done
    from stgc.logs import Phase

    bar = Phase("evaluate", sum(len(t) for t in todo.values()), unit="task") if progress else None
    try:
        for (method, seed), tasks in todo.items():
            if (method, seed) in train_errors:
                err = train_errors[(method, seed)]
                for task in tasks:
                    fail(method, seed, task, err, f"training failed: {_one_line(err)}")
                if bar is not None:
                    bar.update(len(tasks))
                continue
            checkpoint = checkpoints[(method, seed)]
            left = list(tasks)
            try:
                results_of = evaluate_fn(
                    checkpoint,
                    tasks,
                    out_dir_of=lambda t, m=method, s=seed, c=checkpoint: _eval_dir(sweep, m, s, t, c),
                    limit=sweep.eval.limit,
                    batch_size=sweep.eval.batch_size,
                    source=source,
                    mini_root=root,
                    model_args=dict(sweep.eval.model_args),
                    gen_kwargs=sweep.eval.gen_kwargs,
                )
                for task, result in results_of:
                    left.remove(task)
                    if bar is not None:
                        bar.update(1, note=f"{method} seed {seed}")
                    if isinstance(result, BaseException):
                        fail(method, seed, task, result)
                        continue
                    if result is None:  # not rank 0
                        continue
                    finished[(method, seed, task)] = result.results
                    evaluated.append((method, seed, task))
                    write_scores()
            except Exception as err:  # the checkpoint does not load (or the evaluator broke): its cells fail
                for task in left:
                    fail(method, seed, task, err)
                if bar is not None:
                    bar.update(len(left))
    finally:
        if bar is not None:
            bar.close()

    scores = write_scores()
    table, constant = None, {}
    if len(scores) and sweep.baseline in set(scores["method"]):
        tasks_with_scores = [t for t in sweep.tasks if t in set(scores["task"])]
        table = wide_table(scores, baseline=sweep.baseline, tasks=tasks_with_scores)
        write_wide_csv(table, out / TABLE_NAME)
        from evals.tables import render_markdown

        reference = None
        from stgc.data.suite import MARKER

        if (
            source == "mini" and (root / MARKER).exists()
        ):  # a generated suite: the floor every model must beat
            from evals.constant_answer import CONSTANT_NAME, REFERENCE_LABEL, constant_answer_scores

            constant = constant_answer_scores(root, tasks_with_scores, out / CONSTANT_NAME)
            reference = {REFERENCE_LABEL: constant} if constant else None
        _write_text_atomic(
            out / TABLE_MD_NAME,
            render_markdown(scores, baseline=sweep.baseline, tasks=tasks_with_scores, reference=reference),
        )
    failures_path = out / FAILURES_NAME
    if failures:
        _write_text_atomic(
            failures_path, json.dumps([dataclasses.asdict(f) for f in failures], indent=2) + "\n"
        )
    elif failures_path.exists():
        failures_path.unlink()
    return SweepResult(out, scores, table, failures, evaluated, ignored, constant)


def _eval_dir(sweep: Sweep, method: str, seed: int, task: str, checkpoint: Path) -> Path:
    """Where a cell's results of `checkpoint` are written."""
    return sweep.run_dir(method, seed) / "eval" / checkpoint.name / task


def _final_results(
    sweep: Sweep, method: str, seed: int, task: str, fingerprint: dict[str, Any], ignored: list[str]
) -> dict[str, Any] | None:
    """The cell's results if they are its run's final checkpoint's (the module docstring); every other
    finished result found for the cell is named in `ignored`."""
    from evals.run import load_results
    from stgc.checkpoints import final_checkpoint_of

    run = sweep.run_dir(method, seed)
    final = final_checkpoint_of(run)
    found = sorted(run.glob(f"eval/*/{task}/results.json")) if (run / "eval").is_dir() else []
    accepted = None
    for path in found:
        results = load_results(path.parent)
        if not _finished(results, task, fingerprint):
            continue  # other evaluation settings: redone without comment
        where = path.parent.relative_to(run.parent)
        if final is None:
            why = f"{where} is from a run that has not finished (no final checkpoint yet)"
        else:
            why = _not_final(results, where, final)
        if why is None:
            accepted = results
        else:
            ignored.append(f"{method} seed {seed} {task}: {why}")
    return accepted


class _training_phase:
    """The training phase's progress bar. With the default trainer it counts optimizer steps of every run
    (and of an upcycled run's dense parent when that is trained first), planned from the configs; with an
    injected trainer it counts runs."""

    def __init__(self, configs: dict[tuple[str, int], Any], default_trainer: bool, progress: bool) -> None:
        self.configs, self.default_trainer, self.progress = configs, default_trainer, progress
        self.phase = None
        self._stack: Any = None

    def __enter__(self) -> Callable[[tuple[str, int]], None]:
        if not self.progress or not self.configs:
            return lambda run: None
        from stgc.logs import Phase

        if not self.default_trainer:
            self.phase = Phase("train", len(self.configs), unit="run")
            return lambda run: self.phase.update(1, note=f"{run[0]} seed {run[1]}")
        import contextlib

        from stgc.logs import training_phase

        self.phase = Phase("train", planned_steps(list(self.configs.values())), unit="step")
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(training_phase(self.phase))
        return lambda run: None

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:
            self._stack.close()
        if self.phase is not None:
            self.phase.close()


def planned_steps(configs: list[Any]) -> int:
    """Optimizer steps left to train `configs` (stgc.recipes.RunConfig) and the `recipe:` parents they start
    from: 0 for a finished run, the full count otherwise (as transformers' Trainer counts them: ceil(epochs x
    ceil(N / batch) / grad_accum) on one process, or max_steps)."""
    from stgc.recipes import INIT_RECIPE_PREFIX, get_recipe

    total, seen = 0, set()
    for config in configs:
        chain = [config]
        init = config.model.init
        if init.startswith(INIT_RECIPE_PREFIX):
            parent = get_recipe(init[len(INIT_RECIPE_PREFIX) :])
            chain.insert(
                0, parent.replace(output_dir=str(config.run_dir.parent / parent.name), data=config.data)
            )
        for run in chain:
            key = str(run.run_dir)
            if key in seen or (run.run_dir / "final.json").exists():
                continue
            seen.add(key)
            total += _steps(run)
    return total


def _steps(config: Any) -> int:
    t = config.training
    if t.max_steps > 0:
        return t.max_steps
    try:
        n = _dataset_rows(config.data.train)
    except Exception:  # an unreadable dataset fails in training with its own message
        return 0
    if config.data.max_samples is not None:
        n = min(n, config.data.max_samples)
    per_epoch = max(1, math.ceil(n / t.batch_size) // t.grad_accum)
    return math.ceil(t.epochs * per_epoch)


def _dataset_rows(path: str) -> int:
    """Rows of the "train" split of a save_to_disk folder (memory-mapped: nothing is read)."""
    import datasets

    data = datasets.load_from_disk(path)
    return len(data["train"] if isinstance(data, datasets.DatasetDict) else data)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}"


def _log_failure(out: Path, method: str, seed: int, task: str, err: BaseException) -> None:
    """The full traceback of a failed cell, for the user to read after the sweep."""
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    trace = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    (logs / f"{method}-seed{seed}-{task}.log").write_text(trace)


__all__ = [
    "EvalSettings",
    "Failure",
    "PROVENANCE_COLUMNS",
    "SWEEPS",
    "Sweep",
    "SweepResult",
    "get_sweep",
    "peers_sweep",
    "planned_steps",
    "run_sweep",
    "tiny_sweep",
]
