"""`stgc eval <checkpoint> --tasks ...`: evaluate a checkpoint through lmms-eval (evals.run.evaluate).

Data parallel on several GPUs: `accelerate launch --num_processes N -m stgc.cli eval <checkpoint> ...`.
"""

from __future__ import annotations

import argparse
import sys

from evals import tasks as T


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", help="checkpoint folder (runs/<run>/checkpoint-<step>)")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=[T.MOE_LLAVA],
        help=f"task, group or suite names, space- or comma-separated as in `stgc analyze capture` (suites: "
        f"{', '.join(T.SUITES)}; default {T.MOE_LLAVA}); --list-tasks shows them",
    )
    parser.add_argument(
        "--list-tasks", action="store_true", help="list the tasks with their protocols and exit"
    )
    parser.add_argument(
        "--limit", type=float, default=None, help="documents per task (testing only; <1: fraction)"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="requests per forward, per process")
    parser.add_argument(
        "--out", default=None, help="output folder (default runs/<run>/eval/<checkpoint-name>)"
    )
    parser.add_argument(
        "--source", choices=T.SOURCES, default=None, help=f"data source (default ${T.ENV_SOURCE}, else mini)"
    )
    parser.add_argument(
        "--mini-root", default=None, help=f"mini suite folder (default ${T.ENV_MINI_ROOT}, else data/mini)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="override every task's max_new_tokens"
    )


def run(args: argparse.Namespace) -> int:
    if args.list_tasks:
        for name in T.list_tasks():
            info = T.TASKS[name]
            print(f"{name:30s} {info.protocol:10s} {info.headline:22s} {info.note}")
        for suite, names in T.SUITES.items():
            print(f"suite {suite}: {' '.join(names)}")
        return 0
    if not args.checkpoint:
        print("stgc eval: error: give a checkpoint folder (or --list-tasks)", file=sys.stderr)
        return 2
    from evals.run import EvalFailedError, EvalInputError, evaluate

    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    model_args: dict = {}
    if args.batch_size < 1 or (limit is not None and limit <= 0):
        print(
            f"stgc eval: error: --batch-size {args.batch_size} / --limit {args.limit}: the batch size must "
            "be >= 1 and the limit > 0 (a document count, or a fraction in (0, 1)).",
            file=sys.stderr,
        )
        return 2
    try:
        result = evaluate(
            args.checkpoint,
            [t for item in args.tasks for t in item.split(",") if t],
            out_dir=args.out,
            limit=limit,
            batch_size=args.batch_size,
            source=args.source,
            mini_root=args.mini_root,
            model_args=model_args,
            gen_kwargs=f"max_new_tokens={args.max_new_tokens}" if args.max_new_tokens else None,
            device=args.device,
        )
    except EvalInputError as err:
        print(f"stgc eval: error: {err}", file=sys.stderr)
        return 2
    except EvalFailedError as err:
        print(f"stgc eval: error: {err}", file=sys.stderr)
        return 1
    if result is None:  # a non-zero rank under accelerate launch
        return 0
    scores = result.scores()
    for task in result.results["stgc"]["tasks"]:
        headline = T.HEADLINE[task]
        value = scores.loc[(scores["task"] == task) & (scores["metric"] == headline), "value"]
        shown = f"{value.iloc[0]:.4f}" if len(value) else "n/a"
        print(f"{task:30s} {headline:22s} {shown}  [{T.PROTOCOLS[task]}]")
    print(f"results: {result.out_dir}")
    return 0
