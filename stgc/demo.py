"""`stgc demo`: the embedded default end to end, on CPU.

1. the mini suite (`stgc data`) into data/mini, unless it is there;
2. the `tiny` sweep (`stgc sweep tiny`): a dense tiny LLaVA, upcycled to top-2-of-4 MoE, trained with the
   baseline and with STGC for 2 seeds each, every checkpoint evaluated on the ten mini benchmarks through
   lmms-eval -> results/tiny/scores.csv and table.csv;
3. routing traces (`stgc analyze capture`) and token-gradient conflict scores (`stgc analyze conflict`) of
   every final checkpoint -> results/tiny/routing/, results/tiny/conflict/;
4. the notebook reports (`stgc report`) -> results/tiny/reports/.

Every step is resumable: finished sweep cells, trace files and conflict files are kept, so an interrupted
demo re-run picks up where it stopped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# The benchmarks whose routing the paper analyses (STGC.md section 6).
CAPTURE_TASKS = ("scienceqa_img", "textvqa", "mmbench")


def run_demo(
    out: Path = Path("results/tiny"),
    data: Path = Path("data/mini"),
    *,
    capture_limit: int = 48,
    conflict_batches: int = 4,
    report: bool = True,
) -> int:
    from analysis.capture import capture_routing
    from analysis.conflict_probe import conflict_on_checkpoint
    from evals.sweep import get_sweep, run_sweep

    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[demo {time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    if not (data / "_SUITE.json").exists():
        from stgc.data import generate_suite

        say(f"generating the mini suite into {data}")
        generate_suite(data)
    sweep = get_sweep("tiny")
    say(f"sweep {sweep.name}: {list(sweep.methods)} x seeds {list(sweep.seeds)} x {len(sweep.tasks)} tasks")
    result = run_sweep(sweep, out)
    checkpoints = result.scores[["method", "seed", "checkpoint"]].drop_duplicates()
    for row in checkpoints.itertuples(index=False):
        stem = f"{row.method}-seed{row.seed}"
        trace = out / "routing" / f"{stem}.parquet"
        if not trace.exists():
            say(f"routing traces of {stem}")
            capture_routing(row.checkpoint, CAPTURE_TASKS, trace, limit=capture_limit, seed=int(row.seed))
        scores = out / "conflict" / f"{stem}.parquet"
        if not scores.exists():
            say(f"token-gradient conflict of {stem}")
            conflict_on_checkpoint(
                row.checkpoint, data / "train", scores, batches=conflict_batches, seed=int(row.seed)
            )
    if report:
        from analysis.report import build_report

        say("executing the notebook reports")
        build_report(out)
    say(f"done: {out / 'table.csv'}, {out / 'reports'}")
    if result.table is not None:
        print(result.table.to_string(index=False))
    if result.failures:
        print(f"{len(result.failures)} sweep cell(s) failed:")
        for f in result.failures:
            print(f"  {f}")
        return 1
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("results/tiny"), help="results folder")
    parser.add_argument("--data", type=Path, default=Path("data/mini"), help="mini suite folder")
    parser.add_argument("--capture-limit", type=int, default=48, help="documents per task for traces")
    parser.add_argument("--no-report", action="store_true", help="skip executing the notebooks")


def run(args: argparse.Namespace) -> int:
    return run_demo(args.out, args.data, capture_limit=args.capture_limit, report=not args.no_report)
