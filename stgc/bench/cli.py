"""`stgc bench <name>`: speed and memory benchmarks, each in its own module (imported only when run).

Each module defines ``add_arguments(parser)`` and ``run(args) -> int``, like the top-level subcommands.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "moe": ("stgc.bench.moe", "MoE block vs DeepSpeed's MoE layer: forward+backward time and peak memory"),
    "stgc": ("stgc.bench.stgc", "training-step overhead of STGC (two_pass / fused) against the baseline"),
    "eval": ("evals.bench", "evaluation throughput through lmms-eval"),
    "step": ("stgc.bench.step", "full training step of every method preset, alone and with STGC"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    lines = [f"  {name:<8} {help_text}" for name, (_, help_text) in BENCHMARKS.items()]
    parser.epilog = "benchmarks:\n" + "\n".join(lines)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("name", choices=list(BENCHMARKS), help="which benchmark")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options (see --help)")


def run(args: argparse.Namespace) -> int:
    module_name, help_text = BENCHMARKS[args.name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"stgc bench {args.name}", description=help_text)
    module.add_arguments(parser)
    try:
        return int(module.run(parser.parse_args(args.args)) or 0)
    except ValueError as err:  # a benchmark's own check of its settings: one line, not a traceback
        print(f"stgc bench {args.name}: error: {err}", file=sys.stderr)
        return 2
