"""``stgc train <recipe> [key=value ...] [--output-dir DIR] [--resume]``: train a named recipe.

Examples:
    stgc train tiny                                   # baseline, runs/tiny-baseline-seed0
    stgc train tiny method.name=stgc method.beta=0.05 training.seed=1
    stgc train tiny_stgc --output-dir runs/x --resume
    stgc train tiny_stgc --output-dir runs/x --resume-from checkpoint-125   # an earlier complete checkpoint
    stgc train tiny_stgc --output-dir runs/x --reset-optimizer            # weights and step, fresh optimizer
    deepspeed --module stgc.cli train small_stgc      # ZeRO-2 (configs/deepspeed_zero2.json) on every GPU
Bad input prints one line and exits with status 2; a run that fails (non-finite loss) exits with 1.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="recipe name (see --list)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. training.lr=1e-4 method.name=stgc method.beta=0.05 model.moe.top_k=1",
    )
    parser.add_argument("--output-dir", help="run folder (default: runs/<recipe>-<method>-seed<seed>)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue a partial run from its latest checkpoint (without it, a partial run is an error)",
    )
    parser.add_argument(
        "--resume-from",
        metavar="CHECKPOINT",
        help="resume from this checkpoint of the run (checkpoint-<step> or its path) instead of the latest",
    )
    parser.add_argument(
        "--reset-optimizer",
        action="store_true",
        help="resume from the checkpoint's weights and step with a fresh optimizer state (the schedule "
        "continues at the step); for a checkpoint whose optimizer / scheduler / RNG state is lost",
    )
    parser.add_argument(
        "--deepspeed",
        metavar="CONFIG",
        help="DeepSpeed config file (default with the deepspeed launcher: configs/deepspeed_zero2.json)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--list", action="store_true", help="list the recipes and exit")
    # the deepspeed launcher appends --local_rank=N to the command line
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    # key=value overrides may come before and after options (`tiny --resume training.lr=1e-4`): plain
    # parse_args stops filling a positional list at the first option, the intermixed parser does not
    parser.parse_args = parser.parse_intermixed_args  # type: ignore[method-assign]


def _error(message: str, status: int = 2) -> int:
    print(f"stgc train: error: {message}", file=sys.stderr)
    return status


def run(args: argparse.Namespace) -> int:
    from stgc.recipes import RECIPES, apply_overrides, get_recipe

    if args.list:
        for name, fn in RECIPES.items():
            doc = (fn.__doc__ or "").strip().split("\n")[0] or f"= stgc_variant({name.removesuffix('_stgc')})"
            print(f"{name:32s} {doc}")
        return 0
    if not args.recipe:
        return _error(f"give a recipe name; valid recipes are {sorted(RECIPES)}")
    try:
        config = apply_overrides(get_recipe(args.recipe), args.overrides)
        if args.output_dir:
            config = config.replace(output_dir=args.output_dir)
        deepspeed = args.deepspeed
        if deepspeed is None and args.local_rank is not None and config.training.deepspeed is None:
            from stgc.train import DEFAULT_DEEPSPEED_CONFIG

            deepspeed = str(DEFAULT_DEEPSPEED_CONFIG)
        if deepspeed is not None:
            config = config.replace(training=config.training.replace(deepspeed=deepspeed))
        config = config.resolved()
    except ValueError as error:
        return _error(str(error))
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0

    from stgc.train import NonFiniteLossError, train

    try:
        final = train(
            config, resume=args.resume, resume_from=args.resume_from, reset_optimizer=args.reset_optimizer
        )
    except NonFiniteLossError as error:
        return _error(str(error), status=1)
    except ValueError as error:  # bad config / data, incomplete or corrupt checkpoints, a locked run folder
        return _error(str(error))
    print(final)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stgc train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
