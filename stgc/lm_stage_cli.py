"""`stgc pretrain-lm`: stage L (``stgc.lm_stage``), kept apart from it so that `--help` is instant."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (created; refused if it exists)"
    )
    parser.add_argument("--size", default="tiny", help="model size of stgc.backbones (default: %(default)s)")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=Path("data/mini/tokenizer"),
        help="the suite's tokenizer the language model is trained with (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    import sys

    if args.out.exists():
        print(f"stgc pretrain-lm: {args.out} exists; remove it or choose another --out", file=sys.stderr)
        return 2
    if not (args.tokenizer / "tokenizer.json").exists():
        print(
            f"stgc pretrain-lm: no tokenizer in {args.tokenizer}; generate the suite first "
            "(`stgc data --out data/mini`) or pass --tokenizer",
            file=sys.stderr,
        )
        return 2
    from stgc.lm_stage import LMStage, pretrain_language_model

    out = pretrain_language_model(
        args.size, args.tokenizer, args.out, LMStage(seed=args.seed), threads=args.threads, log=print
    )
    print(f"stage L: wrote {out} (settings and held-out accuracies in {out / 'lm_stage.json'})")
    return 0
