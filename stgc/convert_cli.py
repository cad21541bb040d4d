"""`stgc convert`: its arguments, kept apart from `stgc.convert` (which imports torch and the model), so that
`stgc convert --help` is instant; `run` hands the parsed arguments to `stgc.convert.run`."""

from __future__ import annotations

import argparse
from pathlib import Path

ASPECT_RATIOS = ("pad", "square")  # stgc.convert.ASPECT_RATIOS (not imported here: it loads torch)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="MoE-LLaVA checkpoint folder (config.json with a 'moe' dict)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument(
        "--vision-tower", type=Path, default=None, help="CLIP folder (overrides mm_image_tower)"
    )
    parser.add_argument(
        "--image-token-id", type=int, default=None, help="check that <image> gets this vocabulary row"
    )
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer folder (default: the checkpoint's own)"
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the checkpoint's remote-code tokenizer (Qwen-1's needs `pip install tiktoken`)",
    )
    parser.add_argument(
        "--image-aspect-ratio",
        choices=ASPECT_RATIOS,
        default=None,
        help="image preprocessing when config.json has no image_aspect_ratio (or to override it)",
    )
    parser.add_argument(
        "--chat-template", default=None, help="override the backbone's MoE-LLaVA chat template (by name)"
    )
    parser.add_argument(
        "--reproduce-moellava-routing",
        action="store_true",
        help="keep MoE-LLaVA's evaluation routing (capacity, Gumbel 2nd expert, padding routed)",
    )


def run(args: argparse.Namespace) -> int:
    from stgc.convert import run as convert

    return convert(args)
