"""Fault injection (issue 17): training SIGKILLed at random moments, checkpoint writes included, and resumed
each time ends bitwise equal to an uninterrupted run; a sweep SIGKILLed at random moments and re-run ends
with the same scores; two sweeps started at once on one folder: one runs, the other stops with the lock
message, and the result is a single sweep's.

The CI share of results/reliability/fault_injection.py (10 kills of training, 6 of a sweep): a few kills, on
workers forked from one process that has imported everything once (tests/reliability_toys.py).
"""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from evals.sweep import run_sweep
from stgc.train import read_metrics
from tests.reliability_toys import (
    Workers,
    killed_sweep,
    killed_training,
    run_config,
    toy_evaluate,
    toy_sweep,
    toy_train,
)

# what must agree between two sweeps' scores.csv: all but where the files are (checkpoint path) and
# when / from which revision they were made
VALUE_COLUMNS = ["method", "seed", "task", "metric", "value", "n", "checkpoint_step", "checkpoint_hash"]


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    with Workers(tmp_path_factory.mktemp("workers") / "server.log") as w:
        yield w


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An uninterrupted toy run and toy sweep, in this process."""
    root = tmp_path_factory.mktemp("reference")
    final = toy_train(run_config(root / "run"))
    sweep = run_sweep(
        toy_sweep(root / "runs", seeds=(0,)),
        root / "sweep",
        train_fn=toy_train,
        evaluate_fn=toy_evaluate,
        progress=False,
    )
    assert not sweep.failures
    return {"final": final, "scores": _values(root / "sweep" / "scores.csv")}


def _values(scores_csv: Path) -> pd.DataFrame:
    scores = pd.read_csv(scores_csv)[VALUE_COLUMNS]
    return scores.sort_values(VALUE_COLUMNS[:4]).reset_index(drop=True)


def test_training_killed_at_random_moments_ends_bitwise_equal(workers, reference, tmp_path):
    rng = random.Random(17)
    kills = [("step", rng.randint(6, 9)), ("file", (2, rng.randint(1, 3))), ("publish", 1), ("startup", 0.2)]
    run = tmp_path / "run"
    records = killed_training(workers, run, kills)
    assert [r["exit"] for r in records] == [-9] * len(kills) + [0], records
    a, b = (
        load_file(str(reference["final"] / "model.safetensors")),
        load_file(str(run / "checkpoint-30" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # every step logged once, with the uninterrupted run's losses, and nothing of the killed saves left
    ours, theirs = read_metrics(run), read_metrics(reference["final"].parent)
    assert [r["step"] for r in ours] == list(range(1, 31))
    assert [r["loss/total"] for r in ours] == [r["loss/total"] for r in theirs]
    assert not list(run.glob(".checkpoint-staging*"))  # stgc.checkpoints.STAGING_NAME
    assert json.loads((run / "final.json").read_text())["checkpoint"] == "checkpoint-30"


def test_sweep_killed_at_random_moments_ends_with_the_same_scores(workers, reference, tmp_path):
    rng = random.Random(3)
    kills = [(rng.randint(2, 8), rng.uniform(0.0, 0.05)) for _ in range(2)]
    records = killed_sweep(workers, tmp_path / "sweep", tmp_path / "runs", kills, seeds=(0,))
    assert [r["exit"] for r in records] == [-9, -9, 0], records
    pd.testing.assert_frame_equal(_values(tmp_path / "sweep" / "scores.csv"), reference["scores"])


def test_two_sweeps_started_at_once_one_runs_the_other_stops(workers, reference, tmp_path):
    go = tmp_path / "go"
    argv = ["sweep", str(tmp_path / "sweep"), str(tmp_path / "runs"), "--seeds", "0", "--wait-for", str(go)]
    pids = [workers.start(argv), workers.start(argv)]
    go.touch()  # both start their sweep now
    status = {pid: workers.wait(pid) for pid in pids}
    assert sorted(status.values()) == [0, 2], status
    winner = next(pid for pid, code in status.items() if code == 0)
    loser = next(pid for pid, code in status.items() if code == 2)
    errors = [line for line in workers.output(loser) if line.startswith("ERR ")]
    assert len(errors) == 1, errors
    assert (
        "is in use by another sweep" in errors[0]
        and f"pid {winner} on host {socket.gethostname()}" in errors[0]
    )
    pd.testing.assert_frame_equal(_values(tmp_path / "sweep" / "scores.csv"), reference["scores"])
    for run in (tmp_path / "runs").iterdir():  # every run trained once: each step logged once
        assert [r["step"] for r in read_metrics(run)] == list(range(1, 31)), run.name
