"""Sweeps: methods x seeds x tasks, trained where missing, evaluated, tabulated; resumable.

A sweep is defined like a recipe: a Python function returning a `Sweep` (registry `SWEEPS`; `tiny` is the
embedded default: baseline vs STGC on the tiny recipe, 2 seeds, the ten mini benchmarks). Variants derive
in code (`dataclasses.replace`), never by copying a file.

`run_sweep(sweep, out)` walks the grid cell by cell, a cell being (method, seed, task):
- training: `train(config) -> checkpoint` once per (method, seed) with the method's RunConfig, the seed set
  and the run folder `<runs_root>/<method>-seed<seed>` (default runs_root: `runs/<sweep>`). The default
  trainer is `stgc.train.train` (imported when first needed), which skips a finished run and resumes a
  partial one; tests inject a stub.
- evaluation: `evals.run.evaluate` of that checkpoint on the one task, into
  `<run folder>/eval/<checkpoint>/<task>/`. A cell is finished when its run has finished (final.json names
  the final checkpoint), that checkpoint's folder holds a results.json produced with the sweep's evaluation
  settings (source, mini root, limit, gen_kwargs), and the results record that very checkpoint (step and
  content hash, `stgc.checkpoints.checkpoint_identity`): finished cells are skipped (not even trained),
  partial ones (no results.json: killed or failed) are redone. Results of any other checkpoint (an earlier
  one, or a re-trained run's old weights) are ignored, named in `SweepResult.ignored` (the CLI prints them),
  and the cell is evaluated on the final checkpoint.
- one sweep at a time writes `<out>` (`stgc.runlock`): a second one stops at once naming the first; each
  run folder has its own lock, taken by `train`.
- a failing cell is recorded and the others go on; the failures are named at the end (and in
  `<out>/failures.json`), and `run_sweep` reports them (the CLI exits non-zero).
After every cell `<out>/scores.csv` (long, with provenance: evals.tables.LONG_COLUMNS, then
`PROVENANCE_COLUMNS`, the checkpoint's step and content hash) is rewritten
atomically from all finished cells, so a killed sweep leaves a complete CSV of what finished; at the end
`<out>/table.csv` (wide; evals.tables) and `<out>/sweep.json` (the resolved definition) are written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from evals import tasks as T
from evals.tables import LONG_COLUMNS, wide_table, write_wide_csv
from stgc.paths import portable

SCORES_NAME, TABLE_NAME, SWEEP_NAME, FAILURES_NAME = "scores.csv", "table.csv", "sweep.json", "failures.json"
PROVENANCE_COLUMNS = ("checkpoint_step", "checkpoint_hash")  # after LONG_COLUMNS in scores.csv


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How every cell is evaluated (evals.run.evaluate's arguments). source / mini_root None: the
    environment's (STGC_EVAL_SOURCE, STGC_MINI_ROOT), resolved when the sweep runs."""

    batch_size: int = 8
    limit: int | None = None
    source: str | None = None
    mini_root: str | None = None
    gen_kwargs: str | None = None
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """methods: label -> the method's training config (a stgc.recipes.RunConfig; its seed and output folder
    are set per cell). baseline: the label deltas and paired tests are taken against."""

    name: str
    methods: dict[str, Any]
    seeds: tuple[int, ...]
    tasks: tuple[str, ...]
    baseline: str = "baseline"
    eval: EvalSettings = dataclasses.field(default_factory=EvalSettings)
    runs_root: str | None = None

    def __post_init__(self) -> None:
        if not self.methods or not self.seeds:
            raise ValueError(f"sweep {self.name!r} needs at least one method and one seed")
        if self.baseline not in self.methods:
            raise ValueError(
                f"sweep {self.name!r}: baseline {self.baseline!r} is not one of its methods "
                f"{list(self.methods)}"
            )
        object.__setattr__(self, "tasks", tuple(T.expand_tasks(list(self.tasks))))
        for label in self.methods:
            if not label or "/" in label or label.startswith("."):
                raise ValueError(f"method label {label!r} must be a plain folder name")

    def run_dir(self, method: str, seed: int) -> Path:
        return Path(self.runs_root or Path("runs") / self.name) / f"{method}-seed{seed}"

    def run_config(self, method: str, seed: int) -> Any:
        """The RunConfig of one (method, seed): the method's config with the seed and the run folder set."""
        base = self.methods[method]
        return base.replace(
            training=base.training.replace(seed=seed), output_dir=str(self.run_dir(method, seed))
        )


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


# ------------------------------------------------------------------------------------------- registry


def tiny_sweep() -> Sweep:
    """Baseline vs STGC on the tiny recipe (CPU), seeds 0 and 1, the ten mini benchmarks under the
    MoE-LLaVA protocol."""
    from stgc.recipes import stgc_variant, tiny

    return Sweep(
        name="tiny",
        methods={"baseline": tiny(), "stgc": stgc_variant(tiny())},
        seeds=(0, 1),
        tasks=T.SUITES[T.MOE_LLAVA],
    )


SWEEPS: dict[str, Callable[[], Sweep]] = {"tiny": tiny_sweep}


def get_sweep(name: str) -> Sweep:
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; valid sweeps: {', '.join(sorted(SWEEPS))}")
    return SWEEPS[name]()


# ---------------------------------------------------------------------------------------------- runner


def _eval_fingerprint(sweep: Sweep, source: str, root: Path) -> dict[str, Any]:
    return {
        "source": source,
        "mini_root": str(root) if source == "mini" else None,
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
    stgc.train.train; `evaluate_fn` to evals.run.evaluate (both injectable for tests). Raises
    `stgc.runlock.FolderLockedError` at once when another sweep is writing the results folder."""
    from stgc.runlock import folder_lock

    out = Path(out_dir) if out_dir is not None else Path("results") / sweep.name
    with folder_lock(out, "sweep"):
        return _run_sweep(sweep, out, train_fn=train_fn, evaluate_fn=evaluate_fn, progress=progress)


def _run_sweep(
    sweep: Sweep,
    out_dir: str | os.PathLike | None = None,
    *,
    train_fn: Callable[[Any], Path] | None = None,
    evaluate_fn: Callable[..., Any] | None = None,
    progress: bool = True,
) -> SweepResult:
    from evals.run import load_results, scores_from_results
    from stgc.checkpoints import final_checkpoint_of

    if evaluate_fn is None:
        from evals.run import evaluate as evaluate_fn
    train_fn = train_fn or _default_train
    out = Path(out_dir) if out_dir is not None else Path("results") / sweep.name
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
    checkpoints: dict[tuple[str, int], Path] = {}
    train_errors: dict[tuple[str, int], str] = {}
    failures: list[Failure] = []
    evaluated: list[tuple[str, int, str]] = []
    ignored: list[str] = []

    def eval_dir(method: str, seed: int, task: str, checkpoint: Path) -> Path:
        return sweep.run_dir(method, seed) / "eval" / checkpoint.name / task

    def final_results(method: str, seed: int, task: str) -> dict[str, Any] | None:
        """The cell's results if they are its run's final checkpoint's; any other found is reported."""
        run, final = sweep.run_dir(method, seed), final_checkpoint_of(sweep.run_dir(method, seed))
        found = sorted(run.glob(f"eval/*/{task}/results.json")) if (run / "eval").is_dir() else []
        accepted = None
        for path in found:
            results = load_results(path.parent)
            if not _finished(results, task, fingerprint):
                continue  # other evaluation settings: redone without comment, as before
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

    bar = tqdm(cells, desc=f"sweep {sweep.name}", unit="cell", disable=not progress)
    for method, seed, task in bar:
        bar.set_postfix_str(f"{method} seed {seed} {task}")
        results = final_results(method, seed, task)
        if results is not None:
            finished[(method, seed, task)] = results
            continue
        if (method, seed) in train_errors:
            failures.append(Failure(method, seed, task, f"training failed: {train_errors[(method, seed)]}"))
            continue
        try:
            if (method, seed) not in checkpoints:
                try:
                    checkpoints[(method, seed)] = Path(train_fn(sweep.run_config(method, seed)))
                except Exception as err:
                    train_errors[(method, seed)] = _one_line(err)
                    raise
            checkpoint = checkpoints[(method, seed)]
            result = evaluate_fn(
                checkpoint,
                [task],
                out_dir=eval_dir(method, seed, task, checkpoint),
                limit=sweep.eval.limit,
                batch_size=sweep.eval.batch_size,
                source=source,
                mini_root=root,
                model_args=dict(sweep.eval.model_args),
                gen_kwargs=sweep.eval.gen_kwargs,
            )
            finished[(method, seed, task)] = result.results
            evaluated.append((method, seed, task))
        except Exception as err:  # one cell's failure must not stop the others (KeyboardInterrupt does)
            message = train_errors.get((method, seed))
            message = f"training failed: {message}" if message else _one_line(err)
            failures.append(Failure(method, seed, task, message))
            _log_failure(out, method, seed, task, err)
            continue
        write_scores()
    bar.close()

    scores = write_scores()
    table = None
    if len(scores) and sweep.baseline in set(scores["method"]):
        tasks_with_scores = [t for t in sweep.tasks if t in set(scores["task"])]
        table = wide_table(scores, baseline=sweep.baseline, tasks=tasks_with_scores)
        write_wide_csv(table, out / TABLE_NAME)
    failures_path = out / FAILURES_NAME
    if failures:
        _write_text_atomic(
            failures_path, json.dumps([dataclasses.asdict(f) for f in failures], indent=2) + "\n"
        )
    elif failures_path.exists():
        failures_path.unlink()
    return SweepResult(out, scores, table, failures, evaluated, ignored)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}"


def _log_failure(out: Path, method: str, seed: int, task: str, err: BaseException) -> None:
    """The full traceback of a failed cell, for the user to read after the sweep."""
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    trace = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    (logs / f"{method}-seed{seed}-{task}.log").write_text(trace)
