"""`stgc pretrain-lm`: stage L (``stgc.lm_stage``), kept apart from it so that `--help` is instant."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (created; refused if it exists)"
    )
    parser.add_argument(
        "--size", default="tiny", choices=("tiny",), help="model size (9 image positions: tiny only)"
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=Path("data/mini/tokenizer"),
        help="the suite's tokenizer the language model is trained with (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: LMStage's)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="questions per step (default: LMStage's)"
    )
    parser.add_argument(
        "--max-phase-steps",
        type=int,
        default=None,
        help="step limit of every phase that stops at a goal (default: the phases' own)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
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
    import dataclasses

    from stgc.lm_stage import LMStage, pretrain_language_model

    stage = LMStage(seed=args.seed)
    for key in ("lr", "batch_size"):
        if getattr(args, key) is not None:
            stage = dataclasses.replace(stage, **{key: getattr(args, key)})
    if args.max_phase_steps is not None:
        phases = tuple(
            dataclasses.replace(p, max_steps=args.max_phase_steps) if p.goal else p for p in stage.phases
        )
        stage = dataclasses.replace(stage, phases=phases)
    if args.device and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(
                f"stgc pretrain-lm: --device {args.device} but no CUDA device is visible; use --device cpu",
                file=sys.stderr,
            )
            return 2
    try:
        out = pretrain_language_model(
            args.size, args.tokenizer, args.out, stage, threads=args.threads, log=print, device=args.device
        )
    except ValueError as error:  # bad settings or a tokenizer stage L cannot use: one line
        print(f"stgc pretrain-lm: {error}", file=sys.stderr)
        return 2
    print(f"stage L: wrote {out} (settings and held-out accuracies in {out / 'lm_stage.json'})")
    return 0
