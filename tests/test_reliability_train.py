"""Issue 17, training: one writer per run folder, resume restores everything or refuses, checkpoints are
written whole, every float of a config is finite, training rows are checked on load.

The toy trainer setup is test_train.py's. The kill-at-random-moments test is test_fault_injection.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers.trainer_utils import get_last_checkpoint

from stgc.callbacks import StopAtStepCallback
from stgc.train import CheckpointError, read_metrics, train
from tests.test_train import final_weights, toy_components
from tests.test_train import toy_config as _toy_config

REPO = Path(__file__).resolve().parents[1]
# stgc.runlock and stgc.checkpoints are imported inside the tests that use them, so that on a revision
# without them the other tests still run (and fail on what they check)

HOLDER = """
import sys, time
from stgc.runlock import folder_lock
with folder_lock(sys.argv[1], "run"):
    print("locked", flush=True)
    time.sleep(600)
"""


def toy_config(tmp_path: Path, name: str = "run", **training):
    """test_train's toy run on one CPU thread: on a busy 2-core machine two threads wait on each other
    (a 64x12 product: 5 us with one thread, up to 0.9 ms with two)."""
    return _toy_config(tmp_path, name, **{"cpu_threads": 1, **training})


def _hold_lock(folder: Path) -> subprocess.Popen:
    """A process holding the lock of ``folder`` (until killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _equal_weights(a: Path, b: Path) -> bool:
    wa, wb = final_weights(a), final_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The final checkpoint of the toy run (6 steps, checkpoints every 2) trained without interruption."""
    root = tmp_path_factory.mktemp("full")
    return train(toy_config(root, "full", save_steps=2), components=toy_components())


# ------------------------------------------------------------------------------------------ the lock


def test_a_second_writer_is_refused_at_once_and_a_dead_holders_lock_is_taken_over(tmp_path):
    from stgc.runlock import FolderLockedError, read_holder

    config = toy_config(tmp_path, max_steps=2, save_steps=2)
    run = Path(config.output_dir)
    holder = _hold_lock(run)
    try:
        start = time.perf_counter()
        with pytest.raises(FolderLockedError) as info:
            train(config, components=lambda c: pytest.fail("a refused run must not build anything"))
        assert time.perf_counter() - start < 5
        message = str(info.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message and str(run) in message
        assert "\n" not in message and not list(run.glob("checkpoint-*"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without releasing anything: its lock is free, and the file names the new holder
    assert read_holder(run)["pid"] == holder.pid
    assert train(config, components=toy_components()).name == "checkpoint-2"
    assert read_holder(run)["pid"] == os.getpid()


def test_the_lock_is_reentrant_in_one_process_and_ranks_of_one_launch_share_it(tmp_path, monkeypatch):
    from stgc.runlock import LOCK_NAME, FolderLockedError, folder_lock, read_holder

    with folder_lock(tmp_path, "sweep"):
        with folder_lock(tmp_path, "sweep"):  # a sweep evaluating a run, then train() on it
            pass
        holder = read_holder(tmp_path)
        assert holder["pid"] == os.getpid() and holder["launch"] is None
    # rank 1 of a launch: joins the lock its rank 0 holds, refuses one held by another launch
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "h", "launch": "10.0.0.1:29500"}))
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with folder_lock(tmp_path, "run"):
        pass
    monkeypatch.setenv("MASTER_PORT", "29501")
    monkeypatch.setattr("stgc.runlock.RANK_WAIT_S", 0.3)
    with pytest.raises(FolderLockedError, match="in use by another run: pid 1 on host h"):
        with folder_lock(tmp_path, "run"):
            pass


def test_stgc_train_on_a_locked_run_folder_is_one_line_exit_2(tmp_path, capsys):
    from stgc.cli import main

    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        assert main(["train", "tiny", "--output-dir", str(run), "model.init=scratch"]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pid {holder.pid}" in err and "Traceback" not in err


# ------------------------------------------------------------------------------- resume verification


def test_resume_refuses_a_checkpoint_without_optimizer_or_scheduler_state(tmp_path, uninterrupted):
    config = toy_config(tmp_path, save_steps=2)
    run = Path(config.output_dir)
    train(config, components=toy_components(), callbacks=[StopAtStepCallback(4)])
    latest = run / "checkpoint-4"
    optimizer = (latest / "optimizer.pt").read_bytes()
    for name, damage, words in (
        ("optimizer.pt", "delete", "optimizer.pt is missing"),
        ("scheduler.pt", "delete", "scheduler.pt is missing"),
        ("rng_state.pth", "delete", "rng_state.pth is missing"),
        ("optimizer.pt", "truncate", "optimizer.pt is corrupt or truncated"),
    ):
        path = latest / name
        data = path.read_bytes()
        path.unlink() if damage == "delete" else path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError) as info:
            train(config, components=toy_components())
        message = str(info.value)
        assert words in message and "\n" not in message
        assert "--resume-from checkpoint-2" in message and "--reset-optimizer" in message
        path.write_bytes(data)
    assert (latest / "optimizer.pt").read_bytes() == optimizer
    # the way out through the earlier complete checkpoint ends exactly where the uninterrupted run does
    (latest / "optimizer.pt").unlink()
    final = train(config, components=toy_components(), resume_from="checkpoint-2")
    assert final == run / "checkpoint-6" and _equal_weights(final, uninterrupted)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(CheckpointError, match="not a checkpoint of"):
        train(config.replace(output_dir=str(tmp_path / "other")), resume_from="checkpoint-9")


def test_reset_optimizer_continues_from_the_weights_with_the_schedule_at_its_step(tmp_path, uninterrupted):
    config = toy_config(tmp_path, save_steps=2)
    train(config, components=toy_components(), callbacks=[StopAtStepCallback(4)])
    (Path(config.output_dir) / "checkpoint-4" / "optimizer.pt").write_bytes(b"PK\x03\x04 cut")
    final = train(config, components=toy_components(), reset_optimizer=True)
    assert final.name == "checkpoint-6" and not _equal_weights(final, uninterrupted)  # fresh Adam moments
    lrs = [r["lr"] for r in read_metrics(final.parent)]
    assert lrs == [r["lr"] for r in read_metrics(uninterrupted.parent)]  # not a restarted warmup


def test_a_missing_weights_file_offers_no_optimizer_reset(tmp_path):
    config = toy_config(tmp_path, save_steps=2)
    train(config, components=toy_components(), callbacks=[StopAtStepCallback(2)])
    (Path(config.output_dir) / "checkpoint-2" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing") as info:
        train(config, components=toy_components(), reset_optimizer=True)
    assert "--reset-optimizer" not in str(info.value) and "another output_dir" in str(info.value)


def test_extra_required_files_and_the_manifest(tmp_path):
    """The hook for state of the run's own (stateful objectives: objectives_state.pt): a name the caller
    requires, or the manifest declares, must be there; every file the manifest lists keeps its size."""
    from stgc.checkpoints import MANIFEST_NAME, resume_requirements, verify_checkpoint

    config = toy_config(tmp_path, max_steps=2, save_steps=2)
    ckpt = train(config, components=toy_components())
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    assert manifest["step"] == 2 and {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= set(
        manifest["required"]
    )
    assert manifest["files"]["run_config.json"] == (ckpt / "run_config.json").stat().st_size
    required = resume_requirements(extra=("objectives_state.pt",))
    assert [str(p) for p in verify_checkpoint(ckpt, required)] == ["objectives_state.pt is missing"]
    manifest["required"].append("objectives_state.pt")
    (ckpt / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert [str(p) for p in verify_checkpoint(ckpt, resume_requirements())] == [
        "objectives_state.pt is missing"
    ]
    torch.save({"step": 2}, ckpt / "objectives_state.pt")
    (ckpt / "config.json").write_text((ckpt / "config.json").read_text() + " ")
    assert [p.name for p in verify_checkpoint(ckpt, resume_requirements())] == ["config.json"]


# ----------------------------------------------------------------------------------- atomic writing


class _FailingSave(Exception):
    pass


def test_a_save_cut_short_leaves_the_previous_checkpoint_as_the_latest(tmp_path, monkeypatch, uninterrupted):
    """A save that dies after writing the weights and the optimizer state (here an exception inside
    torch.save of the scheduler; test_fault_injection.py kills the process instead) publishes nothing."""
    config = toy_config(tmp_path, save_steps=2)
    run = Path(config.output_dir)
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("scheduler.pt") and "checkpoint-4" in str(f):
            real_save(obj, f, *args, **kwargs)
            Path(f).write_bytes(Path(f).read_bytes()[:10])
            raise _FailingSave
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(_FailingSave):
        train(config, components=toy_components())
    monkeypatch.setattr(torch, "save", real_save)
    assert Path(get_last_checkpoint(str(run))).name == "checkpoint-2"
    final = train(config, components=toy_components())
    assert _equal_weights(final, uninterrupted) and not list(run.glob(".checkpoint-staging*"))


# ------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "override, words",
    [
        ("method.beta=nan", "stgc.beta=nan is not a finite number"),
        ("training.lr=inf", "training.lr=inf is not a finite number"),
        ("model.moe.aux_loss_coef=nan", "moe.aux_loss_coef=nan is not a finite number"),
        ("method.tau=-inf", "stgc.tau=-inf is not a finite number"),
        ("training.weight_decay=inf", "training.weight_decay=inf is not a finite number"),
        ("training.epochs=-1", "training.epochs=-1.0 must be >= 0"),
    ],
)
def test_every_float_of_a_config_is_checked_at_construction(override, words, capsys):
    from stgc.cli import main
    from stgc.recipes import apply_overrides, get_recipe

    with pytest.raises(ValueError, match=words.replace(".", r"\.").replace("(", r"\(")):
        apply_overrides(get_recipe("tiny_stgc"), [override])
    assert main(["train", "tiny_stgc", override, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err


def test_a_new_config_class_gets_the_finite_check_without_calling_it():
    """Config classes added later (the objectives' configs) are covered by ConfigBase alone."""
    import dataclasses

    from stgc.config import ConfigBase

    @dataclasses.dataclass(frozen=True)
    class ZLossConfig(ConfigBase):
        coef: float = 1e-3
        weights: tuple[float, ...] = (1.0,)

        def __post_init__(self) -> None:
            if self.coef < 0:
                raise ValueError("coef < 0")

    @dataclasses.dataclass(frozen=True)
    class PlainConfig(ConfigBase):
        rate: float = 0.5

    with pytest.raises(ValueError, match=r"zloss\.coef=nan is not a finite number; set a finite value"):
        ZLossConfig(coef=float("nan"))
    with pytest.raises(ValueError, match=r"zloss\.weights=\(1\.0, inf\)"):
        ZLossConfig(weights=(1.0, float("inf")))
    with pytest.raises(ValueError, match=r"plain\.rate=inf"):
        PlainConfig.from_dict({"rate": float("inf")})
    assert ZLossConfig(coef=0.5).coef == 0.5
