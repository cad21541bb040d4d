"""The `stgc` command. Each subcommand lives in its own module and is imported only when used, and no
subcommand module imports torch or transformers before its `run`, so `stgc --help` and every `stgc COMMAND
--help` are instant (tests/test_cli_help.py) and a broken optional dependency cannot break unrelated
subcommands. Every subcommand takes `-v/--verbose`: without it, libraries speak at warning level and long
commands show one progress bar per phase (stgc.logs)."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help). Each module defines `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "data": ("stgc.data.cli", "generate the mini benchmark suite, training mixture and tokenizer"),
    "pretrain-lm": ("stgc.lm_stage_cli", "stage L: pretrain the tiny language model on symbolic scenes"),
    "train": ("stgc.train_cli", "train a recipe (baseline, STGC, ...) with key=value overrides"),
    "convert": ("stgc.convert_cli", "convert a MoE-LLaVA (DeepSpeed-MoE) checkpoint to this format"),
    "eval": ("evals.cli_eval", "evaluate a checkpoint on benchmarks through lmms-eval"),
    "sweep": ("evals.cli_sweep", "run a sweep: methods x seeds x tasks, then write the tables"),
    "analyze": ("analysis.cli", "routing traces and routing / conflict statistics"),
    "report": ("analysis.report", "execute the notebook reports of a results folder"),
    "bench": ("stgc.bench.cli", "speed and memory benchmarks (writes results/bench/*.csv)"),
    "demo": ("evals.demo", "the embedded default end to end: data, tiny sweep, tables, reports"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stgc",
        description="MoE-LLaVA training with STGC, lmms-eval benchmark sweeps and routing analysis.",
        epilog="`stgc COMMAND --help` shows a command's options; `make demo` runs the embedded default.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The `deepspeed` launcher puts --local_rank before the script's own arguments
    # (`deepspeed --module stgc.cli train ...` runs `stgc.cli --local_rank=0 train ...`): hand it to the
    # subcommand (`stgc train` accepts it).
    while argv and argv[0].startswith("--local_rank"):
        flag = [argv.pop(0)]
        if "=" not in flag[0] and argv:
            flag.append(argv.pop(0))
        argv += flag
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(
                f"stgc: unknown command {argv[0]!r}; valid commands: {', '.join(SUBCOMMANDS)}",
                file=sys.stderr,
            )
            return 2
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"stgc {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(parser)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show everything the libraries log and print"
    )
    args = parser.parse_args(rest)
    from stgc.logs import configure

    configure(args.verbose or None)  # before the subcommand imports the libraries it quiets
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
