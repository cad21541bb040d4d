"""`stgc analyze`: routing traces and routing / conflict statistics.

    stgc analyze capture <checkpoint> --tasks T [T ...] --out <traces.parquet> [--limit N] [--batch-size B]
                         [--overwrite] [--data-root data/mini] [--source mini|hub] [--max-new-tokens N]
    stgc analyze conflict <checkpoint> --data data/mini/train --out <scores.parquet> [--batches N]
                          [--batch-size B] [--overwrite]
    stgc analyze routing <traces.parquet> [...] --out <dir> [--top-n N] [--overwrite]

capture and conflict are the expensive steps (a model on data, once per checkpoint); routing is cheap
(tables from trace files). Bad input prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from analysis import DEFAULT_MAX_NEW_TOKENS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="analysis", metavar="{capture,conflict,routing}", required=True)

    cap = sub.add_parser("capture", help="run a checkpoint over benchmarks and write its routing traces")
    cap.add_argument("checkpoint", help="checkpoint folder (runs/<run>/checkpoint-<step>)")
    cap.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        help="project tasks / groups / suites (stgc_scienceqa_img, stgc_pope, moe-llava) or mini benchmark "
        "names (scienceqa_img)",
    )
    cap.add_argument("--out", required=True, help="trace file to write (.parquet)")
    cap.add_argument("--limit", type=int, help="documents per task (default: all)")
    cap.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch (default 8)")
    cap.add_argument("--overwrite", action="store_true", help="replace an existing trace file")
    cap.add_argument("--data-root", help="mini-suite folder (default: $STGC_MINI_ROOT or data/mini)")
    cap.add_argument(
        "--source", choices=("mini", "hub"), help="dataset source (default: $STGC_EVAL_SOURCE or mini)"
    )
    cap.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"cap on generated answer tokens (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    cap.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    cap.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    cap.add_argument(
        "--seed", type=int, help="training seed for the metadata (default: the checkpoint's run config)"
    )

    con = sub.add_parser("conflict", help="token gradient conflict scores of a checkpoint on training data")
    con.add_argument("checkpoint", help="checkpoint folder (runs/<run>/checkpoint-<step>)")
    con.add_argument("--data", required=True, help="training set folder (save_to_disk), e.g. data/mini/train")
    con.add_argument("--out", required=True, help="score file to write (.parquet)")
    con.add_argument("--batches", type=int, default=4, help="batches to score (default 4)")
    con.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    con.add_argument("--max-length", type=int, default=2048, help="longest sequence kept (default 2048)")
    con.add_argument("--sample-seed", type=int, default=0, help="seed choosing the rows (default 0)")
    con.add_argument(
        "--score", choices=("mean", "concat", "g1", "g2"), help="score (default: the checkpoint's)"
    )
    con.add_argument("--tau", type=float, help="conflict threshold (default: the checkpoint's, else 0)")
    con.add_argument("--overwrite", action="store_true", help="replace an existing score file")
    con.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    con.add_argument(
        "--seed", type=int, help="training seed for the metadata (default: the checkpoint's run config)"
    )

    rou = sub.add_parser(
        "routing", help="metric tables (loading, pathways, routing stats, NMI) of trace files"
    )
    rou.add_argument("traces", nargs="+", help="trace files written by `stgc analyze capture`")
    rou.add_argument("--out", required=True, help="folder for the CSV tables")
    rou.add_argument("--top-n", type=int, default=10, help="paths in the top-paths table (default 10)")
    rou.add_argument("--overwrite", action="store_true", help="replace existing CSVs")


def run(args: argparse.Namespace) -> int:
    try:
        if args.analysis == "capture":
            from analysis.capture import capture_routing

            path = capture_routing(
                args.checkpoint,
                args.tasks,
                args.out,
                limit=args.limit,
                batch_size=args.batch_size,
                overwrite=args.overwrite,
                source=args.source,
                data_root=args.data_root,
                max_new_tokens=args.max_new_tokens,
                device=args.device,
                dtype=args.dtype,
                seed=args.seed,
                log=print,
            )
            print(f"routing traces written to {path}")
        elif args.analysis == "conflict":
            from analysis.conflict_probe import conflict_on_checkpoint

            path = conflict_on_checkpoint(
                args.checkpoint,
                args.data,
                args.out,
                batches=args.batches,
                batch_size=args.batch_size,
                max_length=args.max_length,
                sample_seed=args.sample_seed,
                score=args.score,
                tau=args.tau,
                overwrite=args.overwrite,
                device=args.device,
                seed=args.seed,
                log=print,
            )
            print(f"conflict scores written to {path}")
        else:
            from analysis.sections import write_routing_tables

            if args.top_n < 1:
                raise ValueError(f"--top-n {args.top_n} must be >= 1")
            for path in write_routing_tables(
                args.traces, args.out, top_n=args.top_n, overwrite=args.overwrite
            ):
                print(f"wrote {path}")
    except ValueError as error:  # bad input: one line naming the problem and the fix
        message = " ".join(str(error).split())
        print(f"stgc analyze {args.analysis}: error: {message}", file=sys.stderr)
        return 2
    return 0
