"""`stgc bench capture`: generation with routing capture on vs off (see ``stgc.bench.eval``)."""

from __future__ import annotations

import argparse

from stgc.bench.eval import add_arguments, run_bench

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    return run_bench(args, "capture")
