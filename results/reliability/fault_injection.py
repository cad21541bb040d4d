"""Fault injection, the full run (tests/test_fault_injection.py is its CI share).

    .venv/bin/python results/reliability/fault_injection.py [--seed 0] [--kills 10] [--sweep-kills 6]

1. Training: the toy run (tests/reliability_toys.py: 60 steps, a checkpoint every 5, baseline and STGC
   fused) is SIGKILLed at ``--kills`` random moments and resumed after each; the kinds are drawn at random:
   a moment while the worker starts (model, Trainer, resume), a step past its resumed checkpoint (when
   that step saves, inside the save), half-way through a torch file of a checkpoint save, or just before
   the rename that publishes it. The final weights must be bitwise equal to an uninterrupted run's, and
   metrics.jsonl must hold every step once with the uninterrupted run's losses.
2. Sweep: the toy sweep (2 methods x 2 seeds x 2 tasks, real training, a toy score that depends on every
   weight) is SIGKILLed ``--sweep-kills`` times at random moments and re-run; its scores.csv must equal an
   uninterrupted sweep's (values, steps and content hashes; paths, dates and revisions aside).

Writes results/reliability/fault_injection.txt (every worker: the kill, the checkpoint it resumed from,
its exit status, the latest checkpoint after it; then the comparisons) and exits 1 if a comparison fails.
Work folders go to a temporary directory.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from evals.sweep import run_sweep  # noqa: E402
from stgc.checkpoints import content_hash  # noqa: E402
from stgc.train import read_metrics  # noqa: E402
from tests.reliability_toys import (  # noqa: E402
    Workers,
    killed_sweep,
    killed_training,
    run_config,
    toy_evaluate,
    toy_sweep,
    toy_train,
)

STEPS = 60
VALUE_COLUMNS = ["method", "seed", "task", "metric", "value", "n", "checkpoint_step", "checkpoint_hash"]


def kill_schedule(rng: random.Random, n: int) -> list[tuple[str, object]]:
    """n kills of random kinds; each worker gets about one checkpoint further than the one before, so that
    the kills spread over the whole run (the driver keeps them before its last step)."""
    kills: list[tuple[str, object]] = []
    for _ in range(n):
        kind = rng.choice(["startup", "step", "step", "file", "publish"])
        value = {
            "startup": round(
                rng.uniform(0.0, 0.4), 3
            ),  # building the model / Trainer, loading the checkpoint
            "step": rng.randint(3, 12),  # when a multiple of 5, the kill lands in that step's save
            "file": (rng.randint(1, 3), rng.randint(1, 4)),  # (which save of the worker, which torch file)
            "publish": rng.randint(1, 3),  # which save of the worker
        }[kind]
        kills.append((kind, value))
    return kills


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--sweep-kills", type=int, default=6)
    parser.add_argument("--out", type=Path, default=HERE / "fault_injection.txt")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    lines = [
        f"fault injection: seed {args.seed}, {args.kills} kills per training run, {args.sweep_kills} of the "
        "sweep"
    ]
    ok = True
    t0 = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="stgc-fault-") as tmp,
        Workers(Path(tmp) / "server.log") as workers,
    ):
        root = Path(tmp)
        for method in ("baseline", "stgc"):
            reference = toy_train(run_config(root / f"{method}-ref", steps=STEPS, method=method))
            kills = kill_schedule(rng, args.kills)
            run = root / f"{method}-killed"
            records = killed_training(workers, run, kills, steps=STEPS, method=method)
            lines += ["", f"training, method {method}: {STEPS} steps, checkpoints every 5", ""]
            lines += ["worker  kill              resumed_from  exit  latest_after"]
            for r in records:
                lines.append(
                    f"{r['worker']:>6}  {r['kill']:<16}  {r['resumed_from']:>12}  {r['exit']:>4}  "
                    f"{r['latest_after']:>12}"
                )
            killed = sum(r["exit"] == -9 for r in records)
            a = load_file(str(reference / "model.safetensors"))
            b = load_file(str(run / f"checkpoint-{STEPS}" / "model.safetensors"))
            bitwise = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            ours, theirs = read_metrics(run), read_metrics(reference.parent)
            steps_once = [r["step"] for r in ours] == list(range(1, STEPS + 1))
            losses = [r["loss/total"] for r in ours] == [r["loss/total"] for r in theirs]
            same_hash = content_hash(reference) == content_hash(run / f"checkpoint-{STEPS}")
            lines += [
                "",
                f"SIGKILLs: {killed} of {len(kills)}; final weights bitwise equal to the uninterrupted run: "
                f"{bitwise} ({len(a)} tensors); content hash equal: {same_hash}; every step logged once: "
                f"{steps_once}; losses equal step by step: {losses}",
            ]
            ok &= killed == len(kills) and bitwise and steps_once and losses and same_hash

        sweep_ref = run_sweep(
            toy_sweep(root / "runs-ref"), root / "sweep-ref", train_fn=toy_train, evaluate_fn=toy_evaluate,
            progress=False,
        )  # fmt: skip
        assert not sweep_ref.failures, sweep_ref.failures
        # each kill after 1-6 more steps of the sweep's progress (18 per seed: checkpoints, finished runs,
        # evaluated cells), then a random 0-50 ms
        kills = [(rng.randint(1, 6), round(rng.uniform(0.0, 0.05), 3)) for _ in range(args.sweep_kills)]
        records = killed_sweep(workers, root / "sweep", root / "runs", kills)
        lines += [
            "",
            "sweep: 2 methods x 2 seeds x 2 tasks (36 steps of progress: 6 checkpoints, the finished run and",
            "2 evaluated cells per run); each kill some progress steps after the worker starts, plus a delay",
            "",
        ]
        lines += ["worker  kill                exit  progress_before  progress_after  score_rows_after"]
        lines += [
            f"{r['worker']:>6}  {r['kill']:<18}  {r['exit']:>4}  {r['progress_before']:>15}  "
            f"{r['progress_after']:>14}  {r['score_rows_after']:>16}"
            for r in records
        ]

        def values(path: Path) -> pd.DataFrame:
            frame = pd.read_csv(path)[VALUE_COLUMNS]
            return frame.sort_values(VALUE_COLUMNS[:4]).reset_index(drop=True)

        same = values(root / "sweep" / "scores.csv").equals(values(root / "sweep-ref" / "scores.csv"))
        killed = sum(r["exit"] == -9 for r in records)
        lines += [
            "",
            f"SIGKILLs: {killed} of {len(kills)}; scores.csv equal to the uninterrupted sweep's "
            f"({', '.join(VALUE_COLUMNS)}): {same} ({len(values(root / 'sweep' / 'scores.csv'))} rows)",
        ]
        ok &= same and killed == len(kills)
    lines += ["", f"total {time.perf_counter() - t0:.0f} s; {'PASS' if ok else 'FAIL'}"]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
