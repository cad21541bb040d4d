"""`stgc bench eval`: generation throughput through lmms-eval.

It runs lmms-eval's own ``simple_evaluate`` on mini-suite tasks with the project's model adapter
(``evals.lmms_model.StgcMoeLlava``) already loaded, so the timing covers request handling, image
processing, batched generation and scoring, not model loading.

Batch size 1 vs 16 (``--batch-sizes``): samples/s, the speed-up, and whether every answer is identical
(greedy decoding, no token dropping: batching must not change an answer). Target: >= 5x.

The checkpoint defaults to a randomly initialised ``small`` model (``stgc.backbones``) with the mini
suite's tokenizer (a random model answers until ``max_new_tokens``: the worst case for decode time).
Rounds alternate between the settings compared; the reported time is the median round.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stgc.bench.moe import write_csv
from stgc.provenance import git_revision

DEFAULT_TASKS = ("stgc_gqa", "stgc_textvqa_val", "stgc_pope_moellava_adv", "stgc_scienceqa_img")
COLUMNS = (
    "bench",
    "setting",
    "batch_size",
    "samples",
    "seconds",
    "samples_per_s",
    "ratio",
    "identical_answers",
    "checkpoint",
    "tasks",
    "max_new_tokens",
    "device",
    "torch_version",
    "git_revision",
    "date",
)


def small_checkpoint(out: Path, mini_root: Path, size: str = "small") -> Path:
    """A randomly initialised checkpoint of ``size`` with the mini suite's tokenizer and a processor."""
    from transformers import AutoTokenizer

    from stgc.modeling import save_random_checkpoint

    tok = AutoTokenizer.from_pretrained(str(mini_root / "tokenizer"), local_files_only=True)
    return save_random_checkpoint(out, tok, backbone="stablelm", size=size)


def _ensure_suite(mini_root: Path, docs: int) -> None:
    if not (mini_root / "_SUITE.json").exists():
        from stgc.data import generate_suite

        generate_suite(mini_root, docs=docs, train_size=200)


def _run(lm, tasks, task_dir: Path, limit: int, max_new_tokens: int, tmp: Path) -> tuple[float, dict, int]:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    args = argparse.Namespace(output_path=str(tmp), process_with_media=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        cli_args=args,
        limit=limit,
        bootstrap_iters=0,
        gen_kwargs=f"max_new_tokens={max_new_tokens}",
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    answers = {
        t: [s["resps"][0][0] for s in sorted(v, key=lambda s: s["doc_id"])] for t, v in res["samples"].items()
    }
    return seconds, answers, sum(len(v) for v in answers.values())


def compare(
    settings: dict[str, dict],
    *,
    checkpoint: Path,
    tasks,
    task_dir: Path,
    limit: int,
    max_new_tokens: int,
    rounds: int,
    device: str,
) -> dict[str, dict]:
    """Time each setting (kwargs of StgcMoeLlava) ``rounds`` times, alternating; keep its answers."""
    from evals.lmms_model import StgcMoeLlava

    models = {
        name: StgcMoeLlava(pretrained=str(checkpoint), device=device, **kw) for name, kw in settings.items()
    }
    out = {name: {"times": []} for name in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for lm in models.values():  # warm-up (kernels, compiled code, caches)
            _run(lm, tasks, task_dir, min(limit, 4), max_new_tokens, Path(tmp))
        for _ in range(rounds):
            for name, lm in models.items():
                s, answers, n = _run(lm, tasks, task_dir, limit, max_new_tokens, Path(tmp))
                out[name]["times"].append(s)
                out[name].update(answers=answers, samples=n)
    for name in out:
        out[name]["seconds"] = statistics.median(out[name]["times"])
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: a random `small` model")
    # its own small suite by default: a benchmark must not leave a 200-conversation suite where the demo looks
    parser.add_argument("--mini-root", type=Path, default=Path("data/mini-bench"))
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    parser.add_argument("--limit", type=int, default=64, help="documents per task")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs=2, default=(1, 16), metavar=("SMALL", "LARGE"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="default results/bench/<bench>.csv")
    parser.add_argument("--quick", action="store_true", help="tiny model, few documents (CPU smoke test)")


def run_bench(args: argparse.Namespace, bench: str) -> int:
    from evals.tasks import write_task_dir

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    size = "tiny" if args.quick else "small"
    if args.quick:
        args.limit, args.rounds, args.max_new_tokens = min(args.limit, 4), 1, min(args.max_new_tokens, 4)
    _ensure_suite(args.mini_root, docs=max(args.limit, 8))
    work = Path(tempfile.mkdtemp(prefix="stgc-bench-"))
    checkpoint = args.checkpoint or small_checkpoint(work / "checkpoint", args.mini_root, size)
    task_dir = write_task_dir(work / "tasks", source="mini", mini_root=args.mini_root)
    small_bs, large_bs = args.batch_sizes
    settings = {
        f"batch_size={small_bs}": {"batch_size": small_bs},
        f"batch_size={large_bs}": {"batch_size": large_bs},
    }
    res = compare(
        settings,
        checkpoint=checkpoint,
        tasks=args.tasks,
        task_dir=task_dir,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        rounds=args.rounds,
        device=device,
    )
    names = list(settings)
    first = res[names[0]]
    stamp = dict(
        bench=bench,
        checkpoint=str(args.checkpoint or f"random {size} stablelm"),
        tasks=" ".join(args.tasks),
        max_new_tokens=args.max_new_tokens,
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        torch_version=torch.__version__,
        git_revision=git_revision(),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    rows = []
    for name in names:
        r = res[name]
        rows.append(
            dict(
                setting=name,
                batch_size=settings[name]["batch_size"],
                samples=r["samples"],
                seconds=round(r["seconds"], 3),
                samples_per_s=round(r["samples"] / r["seconds"], 2),
                ratio=round(first["seconds"] / r["seconds"], 3),  # throughput relative to batch size 1
                identical_answers=r["answers"] == first["answers"],
                **stamp,
            )
        )
    out = args.out or Path(f"results/bench/{bench}.csv")
    write_csv(rows, out, COLUMNS)
    for r in rows:
        print(
            f"{bench:8s} {r['setting']:16s} {r['samples']:5d} samples {r['seconds']:8.2f} s "
            f"{r['samples_per_s']:8.2f}/s  ratio {r['ratio']:.3f}  identical={r['identical_answers']}"
        )
    print(f"wrote {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    return run_bench(args, "eval")
