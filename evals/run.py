"""Evaluate one checkpoint on the project's lmms-eval tasks, from Python (`evaluate`) or `stgc eval`.

`evaluate(checkpoint, tasks)` checks its input (checkpoint folder, task names, mini-suite folders and their
schema) before anything slow starts, renders the task folder for the chosen source (`evals.tasks`), runs
`lmms_eval.evaluator.simple_evaluate` in-process with the `stgc_moe_llava` model (exceptions surface; the
lmms-eval CLI would exit 0 on a failed task), checks that every requested task has results, and writes

    <out>/results.json          lmms-eval's results (without samples) + an "stgc" provenance block
    <out>/samples_<task>.jsonl  one logged sample per line (doc id, prompt arguments, reply, scores)
    <out>/tasks/                the rendered task YAMLs the run used

`out` defaults to `runs/<run>/eval/<checkpoint-name>/` for `runs/<run>/<checkpoint-name>/`. `results.json`
is written last and atomically: its presence marks a finished evaluation. Under `accelerate launch` every
process evaluates its shard and only rank 0 writes (and gets a result back).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from evals import tasks as T
from evals.checkpoint import check_checkpoint
from stgc.clusters import check_checkpoint_clusters
from stgc.logs import quiet_output
from stgc.paths import portable
from stgc.provenance import git_revision

MODEL_NAME = "stgc_moe_llava"  # evals.lmms_model.MODEL_NAME (not imported: it loads lmms-eval)

RESULTS_NAME = "results.json"


class EvalInputError(ValueError):
    """Bad user input (checkpoint, task names, dataset folders): one line naming the problem and the fix."""


class EvalFailedError(RuntimeError):
    """The evaluation ran but every request of a task failed (the model adapter's `RequestsFailed`)."""


@dataclass
class EvalResult:
    out_dir: Path
    results: dict[str, Any]  # lmms-eval's results dict (samples removed) with the "stgc" block

    def scores(self, method: str | None = None, seed: int | None = None) -> pd.DataFrame:
        return scores_from_results(self.results, method=method, seed=seed)


def default_out_dir(checkpoint: str | os.PathLike) -> Path:
    checkpoint = Path(checkpoint).resolve()
    return checkpoint.parent / "eval" / checkpoint.name


def check_inputs(
    checkpoint: str | os.PathLike,
    tasks: list[str],
    source: str | None,
    mini_root: str | os.PathLike | None,
    limit: int | float | None = None,
) -> tuple[Path, list[str], str, Path]:
    """Validate everything `evaluate` needs; EvalInputError with the problem and the fix otherwise.
    Returns (checkpoint, expanded task names, source, mini root)."""
    try:
        path = check_checkpoint(checkpoint)
        check_checkpoint_clusters(path)  # MoCLE-style routers: the saved clusters fit router and embedder
        names = T.expand_tasks(tasks)
        source, root = T.resolve_source(source, mini_root)
    except ValueError as err:
        raise EvalInputError(str(err)) from None
    if not names:
        raise EvalInputError(f"no tasks given; valid tasks: {', '.join(T.list_tasks())}")
    paired = [n for n in names if T.TASKS[n].benchmark == "mme"]
    if paired and limit is not None and (limit < 1 or int(limit) % 2):
        # lmms-eval's MME aggregation asserts exactly two questions per image (acc+ is per pair).
        raise EvalInputError(f"--limit {limit} would split MME's question pairs; use an even integer limit")
    if source == "mini":
        for bench in T.benchmarks_of(names):
            check_mini_folder(root, bench)
    return path, names, source, root


def check_mini_folder(root: Path, benchmark: str) -> None:
    """The mini-suite folder of `benchmark` exists, loads, and has the columns lmms-eval's task reads."""
    from datasets import DatasetDict, load_from_disk

    folder = root / benchmark
    regenerate = f"generate it with `stgc data --out {root}` (or set {T.ENV_MINI_ROOT} / --mini-root)"
    from stgc.data.suite import check_generated_suite

    try:
        check_generated_suite(root)  # a suite of another generator version: refused, with the fix
    except ValueError as err:
        raise EvalInputError(str(err)) from None
    if not folder.is_dir():
        raise EvalInputError(f"mini benchmark folder {folder} does not exist; {regenerate}")
    try:
        dataset = load_from_disk(str(folder))
    except Exception as err:  # datasets raises FileNotFoundError / ValueError variants for broken folders
        raise EvalInputError(
            f"{folder} is not a dataset saved with save_to_disk ({err}); {regenerate}"
        ) from None
    split = T.MINI_SPLITS[benchmark]
    if not isinstance(dataset, DatasetDict) or split not in dataset:
        found = sorted(dataset) if isinstance(dataset, DatasetDict) else "a single split"
        raise EvalInputError(f"{folder} has no split {split!r} (found {found}); {regenerate}")
    if benchmark == "pope" and "category" in dataset[split].column_names:
        # every POPE task selects one category; an empty one would fail inside lmms-eval's retried loader
        missing = sorted(set(T.POPE_CATEGORIES) - set(dataset[split]["category"]))
        if missing:
            raise EvalInputError(
                f"{folder} has no POPE rows of category {missing}; {regenerate} with more docs"
            )
    try:
        from stgc.data import check_schema
    except ImportError:  # the generator package is optional for evaluating hub data or foreign folders
        return
    try:
        check_schema(benchmark, dataset)
        from stgc.data.validate import check_eval_rows

        check_eval_rows(benchmark, dataset[split], str(folder))  # None / empty values, before lmms-eval
    except ValueError as err:
        raise EvalInputError(str(err)) from None


def evaluate(
    checkpoint: str | os.PathLike,
    tasks: list[str] | tuple[str, ...] = T.SUITES[T.MOE_LLAVA],
    *,
    out_dir: str | os.PathLike | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    source: str | None = None,
    mini_root: str | os.PathLike | None = None,
    model_args: dict[str, Any] | None = None,
    gen_kwargs: str | None = None,
    device: str | None = None,
    log_samples: bool = True,
) -> EvalResult | None:
    """Evaluate `checkpoint` on `tasks` (task, group or suite names) in one lmms-eval call; see the module
    docstring. Returns None on ranks other than 0. `model_args` go to the model (e.g. max_new_tokens,
    dtype); `gen_kwargs` ("max_new_tokens=16,...") override every task's generation settings (recorded)."""
    path, names, source, root = check_inputs(checkpoint, list(tasks), source, mini_root, limit)
    out = Path(out_dir) if out_dir is not None else default_out_dir(path)
    model = load_model(path, batch_size=batch_size, model_args=model_args, device=device)
    settings = _Settings(path, source, root, limit, batch_size, gen_kwargs, log_samples)
    return _evaluate_loaded(model, names, out, settings)


def evaluate_each(
    checkpoint: str | os.PathLike,
    tasks: list[str] | tuple[str, ...],
    *,
    out_dir_of: Callable[[str], str | os.PathLike],
    limit: int | float | None = None,
    batch_size: int = 1,
    source: str | None = None,
    mini_root: str | os.PathLike | None = None,
    model_args: dict[str, Any] | None = None,
    gen_kwargs: str | None = None,
    device: str | None = None,
    log_samples: bool = True,
) -> Iterator[tuple[str, EvalResult | None | Exception]]:
    """Evaluate `checkpoint` on each task in turn with ONE model load, yielding (task, result) as soon as
    that task's results.json is in `out_dir_of(task)`: a sweep killed mid-way keeps every task finished
    before it, and a failing task is yielded as (task, exception) while the others go on. Input errors
    (EvalInputError) and a model that does not load raise before anything is yielded."""
    path, names, source, root = check_inputs(checkpoint, list(tasks), source, mini_root, limit)
    model = load_model(path, batch_size=batch_size, model_args=model_args, device=device)
    settings = _Settings(path, source, root, limit, batch_size, gen_kwargs, log_samples)
    for name in names:
        try:
            result: EvalResult | None | Exception = _evaluate_loaded(
                model, [name], Path(out_dir_of(name)), settings
            )
        except Exception as err:  # one task's failure must not stop the others (KeyboardInterrupt does)
            result = err
        yield name, result


def load_model(
    checkpoint: Path,
    *,
    batch_size: int = 1,
    model_args: dict[str, Any] | None = None,
    device: str | None = None,
) -> Any:
    """The lmms-eval model `stgc_moe_llava` on `checkpoint`, built the way lmms-eval builds it from
    `--model_args` (so `accelerate launch` data parallelism works as in the lmms-eval CLI)."""
    from lmms_eval import models

    from evals.lmms_model import AdapterInputError

    args = _model_args_string({"pretrained": str(checkpoint), **(model_args or {})})
    extra = {"batch_size": batch_size, "max_batch_size": None, "device": device}
    try:
        return models.get_model(MODEL_NAME).create_from_arg_string(args, extra)
    except AdapterInputError as bad:  # a SystemExit for lmms-eval's CLI; an ordinary input error here
        raise EvalInputError(str(bad.code)) from None


@dataclass(frozen=True)
class _Settings:
    checkpoint: Path
    source: str
    root: Path
    limit: int | float | None
    batch_size: int
    gen_kwargs: str | None
    log_samples: bool


def _evaluate_loaded(model: Any, names: list[str], out: Path, settings: _Settings) -> EvalResult | None:
    """One lmms-eval call of an already loaded model on `names`; writes `out` (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    task_dir = T.write_task_dir(out / "tasks", source=settings.source, mini_root=settings.root)

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from stgc.checkpoints import checkpoint_identity

    identity = checkpoint_identity(settings.checkpoint)  # the weights loaded (hash cached per process)

    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    from evals.lmms_model import AdapterInputError, RequestsFailed

    manager = TaskManager(include_path=str(task_dir), include_defaults=False, model_name=MODEL_NAME)
    try:
        with quiet_output():
            results = simple_evaluate(
                model=model,
                tasks=names,
                batch_size=settings.batch_size,
                limit=settings.limit,
                task_manager=manager,
                gen_kwargs=settings.gen_kwargs,
                log_samples=settings.log_samples,
                bootstrap_iters=0,
                # lmms-eval hands this to aggregation functions that write files (MMBench): keep them in `out`
                cli_args=argparse.Namespace(output_path=str(out), process_with_media=False),
            )
    # the adapter's errors are SystemExits for lmms-eval's CLI; ordinary exceptions here
    except AdapterInputError as bad:
        raise EvalInputError(str(bad.code)) from None
    except RequestsFailed as failed:
        raise EvalFailedError(str(failed.code)) from None
    if results is None:  # not rank 0
        return None
    missing = [n for n in names if n not in results.get("results", {})]
    if missing:
        raise RuntimeError(f"lmms-eval returned no results for task(s) {missing} of {names}")
    samples = results.pop("samples", None) or {}
    results["stgc"] = {
        "checkpoint": portable(settings.checkpoint),
        **identity,  # step and content hash: a sweep uses only its run's final checkpoint's results
        "tasks": names,
        "source": settings.source,
        "mini_root": portable(settings.root) if settings.source == "mini" else None,
        "data": data_fingerprint(settings.source, settings.root),
        "protocols": {n: T.PROTOCOLS[n] for n in names},
        "headline": {n: T.HEADLINE[n] for n in names},
        "git_revision": git_revision(),
        "date": date,
        "limit": settings.limit,
        "batch_size": settings.batch_size,
        "gen_kwargs": settings.gen_kwargs,
    }
    for task, rows in samples.items():
        lines = "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows)
        _write_atomic(out / f"samples_{task}.jsonl", lines)
    _write_atomic(out / RESULTS_NAME, json.dumps(results, indent=2, default=_jsonable) + "\n")
    return EvalResult(out, json.loads(json.dumps(results, default=_jsonable)))


def data_fingerprint(source: str, root: Path) -> str | None:
    """What identifies the evaluated data independently of where it lies: for the mini suite, a hash of its
    `_SUITE.json` (generator version, parameters, row counts: the suite is deterministic in them); None for
    the hub (its datasets carry their own revisions)."""
    if source != "mini":
        return None
    marker = Path(root) / "_SUITE.json"
    if not marker.is_file():
        return None
    return hashlib.sha256(marker.read_bytes()).hexdigest()[:16]


def _model_args_string(args: dict[str, Any]) -> str:
    """lmms-eval parses model_args from "k=v,k=v" (a dict is not accepted by simple_evaluate)."""
    for key, value in args.items():
        if "," in str(value) or "=" in str(key):
            raise EvalInputError(f"model argument {key}={value!r} contains ',' which lmms-eval cannot parse")
    return ",".join(f"{k}={v}" for k, v in args.items() if v is not None)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_results(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The results.json of a finished evaluation, or None when there is none (never ran or interrupted)."""
    path = Path(out_dir) / RESULTS_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def scores_from_results(
    results: dict[str, Any], method: str | None = None, seed: int | None = None
) -> pd.DataFrame:
    """Long score rows (evals.tables.LONG_COLUMNS) of every numeric metric of every requested task.

    task_version is "<task version>/<source>": scores of the mini suite and of the real data never share a
    column. n is the number of scored documents (summed over a group's subtasks)."""
    info = results["stgc"]
    rows = []
    for task in info["tasks"]:
        version = f"{results['versions'].get(task)}/{info['source']}"
        subtasks = T.TASKS[task].subtasks or (task,)
        n = sum(int(results["n-samples"][s]["effective"]) for s in subtasks)
        for key, value in results["results"][task].items():
            metric, _, filt = key.partition(",")
            if (
                not filt
                or "_stderr" in metric
                or isinstance(value, bool)
                or not isinstance(value, int | float)
            ):
                continue
            if isinstance(value, float) and math.isnan(value):
                continue
            rows.append(
                {
                    "method": method,
                    "seed": seed,
                    "checkpoint": info["checkpoint"],
                    "task": task,
                    "task_version": version,
                    "metric": metric if filt == "none" else key,
                    "value": float(value),
                    "n": n,
                    "git_revision": info["git_revision"],
                    "date": info["date"],
                }
            )
    from evals.tables import LONG_COLUMNS

    return pd.DataFrame(rows, columns=list(LONG_COLUMNS))
