"""`stgc demo`: the embedded default end to end, on CPU, in five phases with one progress bar each.

1. data: the mini suite (`stgc data`) into data/mini, unless it is there;
2. train: the `tiny` sweep's runs (`stgc sweep tiny`): a dense tiny LLaVA trained from scratch, upcycled to
   top-2-of-4 MoE and trained with the baseline and with STGC for 2 seeds each -> runs/tiny/;
3. evaluate: every final checkpoint on the ten mini benchmarks through lmms-eval, one model load per
   checkpoint -> <out>/scores.csv, table.csv (for programs) and table.md (for people), plus
   constant_answer.csv: what a fixed answer scores on the same data (the mini suite's scoring check), the
   floor every model must beat;
4. capture: routing traces (`stgc analyze capture`) and token-gradient conflict scores (`stgc analyze
   conflict`) of every final checkpoint -> <out>/routing/, <out>/conflict/;
5. report: the notebook reports (`stgc report`) -> <out>/reports/.
It ends by printing the table. Every step is resumable: finished runs, evaluated tasks, trace and conflict
files are kept, so an interrupted demo picks up where it stopped.

Everything it writes is ignored by git (data/, runs/, results/demo/): a fresh clone stays clean. The
committed reference results are made on purpose with `make reference` (`stgc demo --out results/tiny`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("results/demo")
DEFAULT_DATA = Path("data/mini")
CONSTANT_NAME = "constant_answer.csv"
# The benchmarks whose routing the paper analyses (docs/method.md, "What the analysis measures").
CAPTURE_TASKS = ("scienceqa_img", "textvqa", "mmbench")


def run_demo(
    out: Path = DEFAULT_OUT,
    data: Path = DEFAULT_DATA,
    *,
    capture_limit: int = 48,
    conflict_batches: int = 4,
    report: bool = True,
) -> int:
    """Run the demo into `out` (see the module docstring); 0 when every step succeeded, 1 otherwise."""
    from evals.sweep import get_sweep, run_sweep
    from stgc.logs import Phase

    t0 = time.perf_counter()
    out = Path(out)
    if not (data / "_SUITE.json").exists():
        _generate_data(data)
    sweep = get_sweep("tiny")
    result = run_sweep(sweep, out)
    constant = constant_answer_scores(data, out / CONSTANT_NAME)
    tasks: list[str] = []
    if result.table is not None:
        tasks = [t for t in sweep.tasks if t in set(result.scores["task"])]
        write_table_md(out, result.scores, sweep.baseline, tasks, constant)

    checkpoints = result.scores[["method", "seed", "checkpoint"]].drop_duplicates()
    jobs = []
    for row in checkpoints.itertuples(index=False):
        stem = f"{row.method}-seed{row.seed}"
        jobs += [("routing", stem, row), ("conflict", stem, row)]
    jobs = [j for j in jobs if not (out / j[0] / f"{j[1]}.parquet").exists()]
    if jobs:
        with Phase("capture", len(jobs), unit="file") as bar:
            for kind, stem, row in jobs:
                bar.note(f"{kind} {stem}")
                _capture(kind, row, out / kind / f"{stem}.parquet", data, capture_limit, conflict_batches)
                bar.update(1)
    report_error = None
    if report:
        report_error = _report(out)
    print(f"\nstgc demo: {time.perf_counter() - t0:.0f} s; results in {out}/ (table.md, table.csv, reports/)")
    if result.table is not None:
        from evals.tables import render_text

        reference = {"constant answer": constant} if constant else None
        print(render_text(result.scores, baseline=sweep.baseline, tasks=tasks, reference=reference))
    status = 0
    if result.failures:
        print(f"{len(result.failures)} sweep cell(s) failed (tracebacks in {out / 'logs'}):")
        for f in result.failures:
            print(f"  {f}")
        status = 1
    if report_error is not None:
        print(f"the reports failed: {report_error}")
        status = 1
    return status


def write_table_md(
    out: Path, scores: Any, baseline: str, tasks: list[str], constant: dict[str, float]
) -> Path:
    """<out>/table.md with the constant-answer row under the methods (the sweep writes it without)."""
    from evals.sweep import TABLE_MD_NAME, _write_text_atomic
    from evals.tables import render_markdown

    reference = {"constant answer": constant} if constant else None
    path = Path(out) / TABLE_MD_NAME
    _write_text_atomic(path, render_markdown(scores, baseline=baseline, tasks=tasks, reference=reference))
    return path


def _generate_data(data: Path) -> None:
    from stgc.data import generate_suite
    from stgc.data.params import BENCHMARK_NAMES
    from stgc.logs import Phase

    with Phase("data", len(BENCHMARK_NAMES) + 2, unit="part") as bar:  # + training mixture, tokenizer
        generate_suite(data, log=lambda msg: bar.update(1, note=msg.split(":")[0].strip()))


def _capture(kind: str, row: Any, path: Path, data: Path, limit: int, batches: int) -> None:
    from stgc.logs import quiet_output

    with quiet_output():
        if kind == "routing":
            from analysis.capture import capture_routing

            capture_routing(row.checkpoint, CAPTURE_TASKS, path, limit=limit, seed=int(row.seed))
        else:
            from analysis.conflict_probe import conflict_on_checkpoint

            conflict_on_checkpoint(row.checkpoint, data / "train", path, batches=batches, seed=int(row.seed))


def _report(out: Path) -> str | None:
    from analysis.report import NOTEBOOKS, ReportError, build_report
    from stgc.logs import Phase, quiet_output

    with Phase("report", len(NOTEBOOKS), unit="notebook") as bar:

        def log(message: str) -> None:
            name = message.split(":")[0]
            if name in NOTEBOOKS:  # "<notebook>: <seconds> s": one notebook done
                bar.update(1, note=name)

        try:
            with quiet_output():
                build_report(out, log=log)
        except ReportError as error:
            return str(error)
    return None


def constant_answer_scores(data: Path, path: Path) -> dict[str, float]:
    """The headline score of the scoring check's constant answer for each task of the tiny sweep, on the
    suite in `data` (written to `path` as CSV: task, benchmark, metric, constant_answer, score)."""
    import pandas as pd

    from evals import tasks as T
    from stgc.data.scoring_check import scoring_check
    from stgc.logs import quiet_output

    with quiet_output():
        check = scoring_check(data)
    # the check scores lmms-eval's metric names; a group's headline (POPE's mean F1 over its categories) is
    # the check's mean over categories
    aliases = {"pope_f1_score": "f1_mean_over_categories"}
    rows = []
    for task in T.SUITES[T.MOE_LLAVA]:
        info = T.TASKS[task]
        metric = aliases.get(info.headline, info.headline) if info.subtasks else info.headline
        hit = check[(check["benchmark"] == info.benchmark) & (check["metric"] == metric)]
        if len(hit):
            rows.append(
                {
                    "task": task,
                    "benchmark": info.benchmark,
                    "metric": metric,
                    "constant_answer": hit["constant_answer"].iloc[0],
                    "score": float(hit["constant"].iloc[0]),
                }
            )
    table = pd.DataFrame(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return {r["task"]: r["score"] for r in rows}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"results folder (default {DEFAULT_OUT}; `make reference` writes the committed results/tiny)",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="mini suite folder")
    parser.add_argument("--capture-limit", type=int, default=48, help="documents per task for traces")
    parser.add_argument("--no-report", action="store_true", help="skip executing the notebooks")


def run(args: argparse.Namespace) -> int:
    return run_demo(args.out, args.data, capture_limit=args.capture_limit, report=not args.no_report)
