"""`stgc convert`: its arguments, kept apart from `stgc.convert` (which imports torch and the model), so that
`stgc convert --help` is instant; `run` hands the parsed arguments to `stgc.convert.run`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="MoE-LLaVA checkpoint folder (config.json with a 'moe' dict)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument(
        "--vision-tower", type=Path, default=None, help="CLIP folder (overrides mm_image_tower)"
    )
    parser.add_argument("--image-token-id", type=int, default=None, help="vocabulary row of <image>")
    parser.add_argument(
        "--reproduce-moellava-routing",
        action="store_true",
        help="keep MoE-LLaVA's evaluation routing (capacity, Gumbel 2nd expert, padding routed)",
    )


def run(args: argparse.Namespace) -> int:
    from stgc.convert import run as convert

    return convert(args)
