"""`stgc sweep <name>`: train what is missing, evaluate, write results/<name>/scores.csv and table.csv."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from evals import tasks as T


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from evals.sweep import SWEEPS

    parser.add_argument("name", help=f"sweep name ({', '.join(sorted(SWEEPS))})")
    parser.add_argument("--out", default=None, help="results folder (default results/<name>)")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (testing only)")
    parser.add_argument("--batch-size", type=int, default=None, help="evaluation batch size per process")
    parser.add_argument("--source", choices=T.SOURCES, default=None, help="evaluation data source")
    parser.add_argument("--mini-root", default=None, help="mini suite folder (default data/mini)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from evals.run import EvalInputError
    from evals.sweep import get_sweep, run_sweep
    from stgc.runlock import FolderLockedError

    try:
        sweep = get_sweep(args.name)
    except ValueError as err:
        print(f"stgc sweep: error: {err}", file=sys.stderr)
        return 2
    changes = {
        "limit": args.limit,
        "batch_size": args.batch_size,
        "source": args.source,
        "mini_root": args.mini_root,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if changes:
        sweep = dataclasses.replace(sweep, eval=dataclasses.replace(sweep.eval, **changes))
    try:
        result = run_sweep(sweep, args.out, progress=not args.no_progress)
    except (EvalInputError, FolderLockedError) as err:
        print(f"stgc sweep: error: {err}", file=sys.stderr)
        return 2
    if result.ignored:
        print(
            f"{len(result.ignored)} result(s) not from their run's final checkpoint were ignored (those "
            "cells were evaluated on the final checkpoint):",
            file=sys.stderr,
        )
        for line in result.ignored:
            print(f"  {line}", file=sys.stderr)
    print(f"scores: {result.out_dir / 'scores.csv'} ({len(result.scores)} rows)")
    if result.table is not None:
        print(f"table:  {result.out_dir / 'table.csv'}")
    if result.failures:
        print(
            f"{len(result.failures)} cell(s) failed (tracebacks in {result.out_dir / 'logs'}):",
            file=sys.stderr,
        )
        for failure in result.failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    return 0
