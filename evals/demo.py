"""`stgc demo`: the embedded default end to end, on CPU, in five phases with one progress bar each.

1. data: the mini suite (`stgc data`) into data/mini, unless it is there;
2. train: the `tiny` sweep's runs (`stgc sweep tiny`): a dense tiny LLaVA trained from scratch, upcycled to
   top-2-of-4 MoE and trained with the baseline and with STGC for 2 seeds each -> runs/tiny/;
3. evaluate: every final checkpoint on the ten mini benchmarks through lmms-eval, one model load per
   checkpoint -> <out>/scores.csv, table.csv (for programs) and table.md (for people), plus
   constant_answer.csv: what a fixed answer scores on the same data (the mini suite's scoring check), the
   floor every model must beat, also a row of table.md (both written by the sweep);
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
        from evals.constant_answer import REFERENCE_LABEL
        from evals.tables import render_text

        tasks = [t for t in sweep.tasks if t in set(result.scores["task"])]
        reference = {REFERENCE_LABEL: result.constant} if result.constant else None
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
