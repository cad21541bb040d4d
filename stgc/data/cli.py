"""``stgc data``: generate the mini benchmark suite, the training mixture and the tokenizer."""

from __future__ import annotations

import argparse
import sys
import time

from stgc.data.params import BENCHMARK_NAMES, DEFAULTS, LIMITS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def rng(key: str) -> str:
        lo, hi = LIMITS[key]
        return f"[{lo}, {hi}]"

    parser.add_argument("--out", default="data/mini", help="output folder (default: data/mini)")
    parser.add_argument(
        "--docs",
        type=int,
        default=DEFAULTS["docs"],
        help=f"evaluation rows per benchmark, {rng('docs')} (default: %(default)s; MME / MMBench round up "
        "to whole pairs / circular groups)",
    )
    parser.add_argument(
        "--train-size",
        type=int,
        default=DEFAULTS["train_size"],
        help=f"training conversations, {rng('train_size')}; 0 skips the mixture and the tokenizer "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=DEFAULTS["image_size"],
        help=f"square image side in pixels, {rng('image_size')} (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULTS["seed"], help="random seed (default: %(default)s)"
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULTS["vocab_size"],
        help=f"tokenizer vocabulary upper bound, {rng('vocab_size')} (default: %(default)s)",
    )
    parser.add_argument(
        "--benchmarks",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"subset to generate (default: all): {', '.join(BENCHMARK_NAMES)}",
    )
    parser.add_argument(
        "--llava-replica",
        default=None,
        metavar="DIR",
        help="instead of the suite, write a small replica of LLaVA-mix-665K (llava_v1_5_mix665k.json + its "
        "image folders) to DIR, for data.train / data.image_folder",
    )
    parser.add_argument(
        "--replica-rows", type=int, default=24, help="rows of the replica (default: %(default)s)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing suite in --out")
    parser.add_argument("--quiet", action="store_true", help="print only the final line")


def run(args: argparse.Namespace) -> int:
    from stgc.data.suite import generate_suite  # heavy imports (datasets, tokenizers) only when running

    t0 = time.perf_counter()
    if args.llava_replica is not None:
        from stgc.data.llava_json import write_replica

        if not 1 <= args.replica_rows <= 100_000:
            print(
                f"stgc data: error: --replica-rows {args.replica_rows} is not in [1, 100000]",
                file=sys.stderr,
            )
            return 2
        path = write_replica(args.llava_replica, rows=args.replica_rows, seed=args.seed)
        print(f"stgc data: wrote a {args.replica_rows}-row LLaVA-mix-665K replica to {path}")
        return 0
    try:
        info = generate_suite(
            args.out,
            docs=args.docs,
            train_size=args.train_size,
            image_size=args.image_size,
            seed=args.seed,
            benchmarks=args.benchmarks,
            overwrite=args.overwrite,
            vocab_size=args.vocab_size,
            log=None if args.quiet else print,
        )
    except ValueError as err:
        print(f"stgc data: error: {err}", file=sys.stderr)
        return 2
    rows = sum(b["rows"] for b in info["benchmarks"].values())
    train = info.get("train", {}).get("rows", 0)
    print(
        f"stgc data: wrote {len(info['benchmarks'])} benchmarks ({rows} eval rows), {train} training "
        f"conversations{' and a tokenizer' if train else ''} to {args.out} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0
