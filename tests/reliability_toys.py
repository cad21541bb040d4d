"""Toy runs and sweeps that the reliability tests kill, and the worker processes that run them (not collected
by pytest). Used by tests/test_fault_injection.py and results/reliability/fault_injection.py.

    python -m tests.reliability_toys serve     # forks the workers below (``Workers``)
    train <run_dir> [--steps N] [--kill-in-save KIND:SAVE:INDEX]
    sweep <out> <runs_root> [--wait-for FILE] [--seeds 0,1]

``killed_training`` and ``killed_sweep`` drive the workers: start one, SIGKILL it at a chosen moment, start
the next (which resumes), until a last one runs to the end.

train: the toy run of ``run_config`` (resumed if partial), printing STARTED once imports are done and FINAL
<checkpoint> at the end. ``--kill-in-save`` makes the process SIGKILL itself inside its SAVE-th checkpoint
save (1-based, counted in this process): KIND "file" while writing the INDEX-th file the Trainer writes with
torch.save (optimizer, scheduler, RNG state, training arguments: half of it is written, then the kill),
KIND "publish" just before the rename that publishes the staged checkpoint.
sweep: ``stgc sweep toy --out <out>`` through the CLI, with the toy sweep registered, ``toy_train`` as the
trainer and ``toy_evaluate`` as the evaluation; prints READY once imports are done, then waits for FILE
(so that two workers start their sweeps at the same moment).

The toy evaluation scores a checkpoint by its model's loss on fixed sequences, so a score depends on every
bit of the trained weights, and writes results.json like ``evals.run.evaluate`` (atomically, with the
"stgc" block the sweep reads).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from evals.run import EvalResult
from stgc.recipes import RunConfig, TrainingConfig, stgc_variant
from stgc.train import RunComponents, train
from tests.toy_moe import ToyMoEModel, ToySequences, toy_model

STEPS, SAVE_STEPS, ROWS_PER_STEP = 30, 5, 8  # 8 rows per step: 4 rows x 2 micro-batches
TASKS = ("stgc_gqa", "stgc_mme")
REPO = Path(__file__).resolve().parents[1]


def run_config(
    output_dir: str | os.PathLike | None = None,
    *,
    method: str = "baseline",
    seed: int = 0,
    steps: int = STEPS,
) -> RunConfig:
    """A toy run of one epoch of ``steps`` steps, checkpoints every 5, one CPU thread (bitwise
    reproducible)."""
    config = RunConfig(
        name="toy",
        training=TrainingConfig(
            lr=1e-2,
            max_steps=steps,
            batch_size=4,
            grad_accum=2,
            save_steps=SAVE_STEPS,
            logging_steps=SAVE_STEPS,
            measure_conflict_every=2,
            trainable="all",
            cpu_threads=1,
            seed=seed,
        ),
        output_dir=None if output_dir is None else str(output_dir),
    )
    return stgc_variant(config, beta=0.5) if method == "stgc" else config


def components(config: RunConfig) -> RunComponents:
    model = toy_model("swiglu", num_layers=2, dtype=torch.float32, seed=config.training.seed)
    rows = config.training.max_steps * ROWS_PER_STEP
    return RunComponents(model, ToySequences(rows, seed=config.training.seed), None)


def toy_train(config: RunConfig) -> Path:
    return train(config, components=components)


def toy_score(checkpoint: str | os.PathLike) -> float:
    """The checkpoint model's mean loss on 16 fixed sequences."""
    model = ToyMoEModel.from_pretrained(str(checkpoint)).eval()
    batch = ToySequences(16, seed=123)
    ids = torch.stack([batch[i]["input_ids"] for i in range(len(batch))])
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def toy_evaluate(
    checkpoint, tasks, *, out_dir_of, limit, batch_size, source, mini_root, model_args, gen_kwargs
):
    """evals.run.evaluate_each's contract (one load, then each task's results.json written last and
    atomically into out_dir_of(task) and yielded) with the toy score."""
    from evals.run import data_fingerprint
    from stgc.checkpoints import atomic_write_text, checkpoint_identity

    score = toy_score(checkpoint)
    for task in tasks:
        out = Path(out_dir_of(task))
        out.mkdir(parents=True, exist_ok=True)
        metric = "exact_match" if task == "stgc_gqa" else "mme_perception_score"
        results = {
            "results": {task: {f"{metric},none": score, "alias": task}},
            "versions": {task: 1.0},
            "n-samples": {task: {"original": 16, "effective": 16}},
            "stgc": {
                "checkpoint": str(checkpoint),
                **checkpoint_identity(checkpoint),
                "tasks": [task],
                "source": source,
                "data": data_fingerprint(source, mini_root),
                "limit": limit,
                "gen_kwargs": gen_kwargs,
                "git_revision": "toy",
                "date": "2026-01-01T00:00:00Z",
            },
        }
        atomic_write_text(out / "results.json", json.dumps(results))
        yield task, EvalResult(out, results)


def toy_sweep(runs_root: str | os.PathLike, seeds: Sequence[int] = (0, 1)):
    from evals.sweep import EvalSettings, Sweep

    return Sweep(
        name="toy",
        methods={"baseline": run_config(), "stgc": run_config(method="stgc")},
        seeds=tuple(seeds),
        tasks=TASKS,
        eval=EvalSettings(source="hub"),  # the toy evaluation reads no dataset
        runs_root=str(runs_root),
    )


# --------------------------------------------------------------------------------------------------------
# workers


def _kill_in_save(spec: str) -> None:
    """Patch the checkpoint writers so that the process SIGKILLs itself inside a save (module docstring)."""
    import stgc.checkpoints as C

    kind, save, index = spec.split(":")
    save, index = int(save), int(index)
    count = {"saves": 0, "files": 0}
    real_save, real_publish = torch.save, C.publish

    def die() -> None:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def torch_save(obj, f, *args, **kwargs):
        if C.STAGING_NAME in str(f) and count["saves"] == save - 1 and kind == "file":
            count["files"] += 1
            if count["files"] == index:
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                Path(f).write_bytes(buffer.getvalue()[: buffer.tell() // 2])
                die()
        return real_save(obj, f, *args, **kwargs)

    def publish(staged, final):
        count["saves"] += 1
        count["files"] = 0
        if kind == "publish" and count["saves"] == save:
            die()
        return real_publish(staged, final)

    torch.save = torch_save
    C.publish = publish


# --------------------------------------------------------------------------------------------------------
# workers: forked from a server that has imported everything once


class Workers:
    """Worker processes forked from one server process (``python -m tests.reliability_toys serve``) that
    has already imported torch, transformers and the project: a worker starts in milliseconds instead of
    the ~6 s of imports, so a test can kill and restart many. Each worker is a separate process (its own
    files, locks and memory); SIGKILL ends it as it would end a ``stgc`` command.

        with Workers(log) as w:
            pid = w.start(["train", run_dir])      # the worker's argv (``main``)
            w.kill(pid); status = w.wait(pid)      # -9 when killed
    """

    def __init__(self, log: Path):
        self.log = log
        self.lines: list[str] = []
        self._used: set[int] = set()  # lines an _expect has returned

    def __enter__(self) -> Workers:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.reliability_toys", "serve"],
                cwd=REPO,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self._expect(lambda line: line == "SERVING")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)

    def _expect(self, match) -> str:
        """The first line not returned before that ``match``es, read from the server if not read yet (two
        workers' lines interleave: waiting for one may read the other's EXIT)."""
        for i, line in enumerate(self.lines):
            if i not in self._used and match(line):
                self._used.add(i)
                return line
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the worker server exited; see {self.log}")
            self.lines.append(line.strip())
            if match(self.lines[-1]):
                self._used.add(len(self.lines) - 1)
                return self.lines[-1]

    def start(self, argv: Sequence[str]) -> int:
        """Fork a worker running ``main(argv)``; returns its pid once it has printed its first line."""
        self.proc.stdin.write(json.dumps(list(argv)) + "\n")
        self.proc.stdin.flush()
        pid = int(self._expect(lambda line: line.startswith("PID ")).split()[1])
        self._expect(lambda line: line.startswith(f"{pid} ") and not line.startswith(f"{pid} ERR"))
        return pid

    def kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def wait(self, pid: int) -> int:
        """The worker's exit status: its exit code, or -signal (-9 when SIGKILLed)."""
        return int(self._expect(lambda line: line.startswith(f"EXIT {pid} ")).split()[2])

    def output(self, pid: int) -> list[str]:
        """The lines the worker printed (stderr's start with "ERR ")."""
        return [line.split(" ", 1)[1] for line in self.lines if line.startswith(f"{pid} ")]


def serve() -> int:
    """The worker server: one JSON argv per stdin line -> fork a worker running ``main(argv)``; reports
    ``PID <pid>`` and, when the worker ends, ``EXIT <pid> <status>``. Worker output lines are prefixed
    with the worker's pid."""
    import selectors

    import stgc.train  # noqa: F401 - everything a worker needs, imported once before any fork
    from stgc.cli import main as _  # noqa: F401

    print("SERVING", flush=True)
    children: set[int] = set()
    stdin = sys.stdin.fileno()
    sel = selectors.DefaultSelector()
    sel.register(stdin, selectors.EVENT_READ)
    pending, open_input = b"", True
    while open_input or children:
        if open_input and sel.select(timeout=0.005):
            data = os.read(stdin, 1 << 16)  # raw reads: a buffered reader could hide a second command
            open_input = bool(data)
            if not open_input:
                sel.unregister(stdin)
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                pid = os.fork()
                if pid == 0:
                    _run_worker(json.loads(line))  # never returns
                children.add(pid)
                print(f"PID {pid}", flush=True)
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                print(f"EXIT {pid} {code}", flush=True)
        if not open_input and children:
            time.sleep(0.005)
    return 0


class _Prefixed(io.TextIOBase):
    """stdout / stderr of a worker: each line prefixed with its pid (and "ERR" for stderr), written in one
    call (atomic on the pipe)."""

    def __init__(self, out, tag: str = ""):
        self.out, self.prefix, self.buffer = out, f"{os.getpid()} {tag}", ""

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            self.out.write(f"{self.prefix}{line.rsplit(chr(13), 1)[-1]}\n")  # a progress bar's last state
            self.out.flush()
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def _run_worker(argv: list[str]) -> None:
    code = 1
    try:
        sys.stdin.close()
        sys.stdout = _Prefixed(sys.__stdout__)
        sys.stderr = _Prefixed(sys.__stdout__, "ERR ")
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - a worker reports, it never returns into the server's loop
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# --------------------------------------------------------------------------------------------------------
# drivers


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def _last_step(metrics: Path, stale: int | None) -> int:
    """The last step metrics.jsonl holds, once the worker has rewritten it (a new file: until then it holds
    the killed worker's steps)."""
    if _inode(metrics) in (None, stale):
        return 0
    try:
        lines = metrics.read_text().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0  # a line cut mid-write


def _latest_step(run_dir: Path) -> int:
    from stgc.checkpoints import checkpoints_of

    found = checkpoints_of(run_dir)
    return int(found[-1].name.rsplit("-", 1)[1]) if found else 0


def killed_training(
    workers: Workers,
    run_dir: Path,
    kills: Sequence[tuple[str, Any]],
    *,
    steps: int = STEPS,
    method: str = "baseline",
) -> list[dict[str, Any]]:
    """Train the toy run in ``run_dir`` through workers killed as ``kills`` says, then once to the end.

    A kill is (kind, value): ("startup", s) s seconds after the worker started (building the model and the
    Trainer, the resume); ("step", k) once the worker has logged k steps past its resumed checkpoint (when
    that step saves a checkpoint, the kill lands in the save); ("file", (s, i)) inside the worker's s-th
    checkpoint save, half-way through writing its i-th torch file; ("publish", s) just before the s-th
    save's rename. Kills stay before the last step (k and s are capped), so that every kill happens.
    Returns one record per worker: the kill, the checkpoint it resumed from, its exit status (-9: killed)
    and the latest checkpoint after it."""
    records = []
    for n, (kind, value) in enumerate([*kills, ("none", 0)]):
        resumed = _latest_step(run_dir)
        stale = _inode(run_dir / "metrics.jsonl")
        argv = ["train", str(run_dir), "--steps", str(steps), "--method", method]
        saves_left = max(1, (steps - resumed - 1) // SAVE_STEPS)  # saves before the last step's
        if kind == "file":
            save, index = value
            value = (min(save, saves_left), index)
            argv += ["--kill-in-save", f"file:{value[0]}:{index}"]
        elif kind == "publish":
            value = min(int(value), saves_left)
            argv += ["--kill-in-save", f"publish:{value}:0"]
        pid = workers.start(argv)
        if kind == "startup":
            time.sleep(float(value))
            workers.kill(pid)
        elif kind == "step":
            value = min(int(value), steps - 1 - resumed)
            target = resumed + value
            while _last_step(run_dir / "metrics.jsonl", stale) < target and _alive(pid):
                time.sleep(0.001)
            workers.kill(pid)
        status = workers.wait(pid)
        records.append(
            {"worker": n, "kill": f"{kind} {value}", "resumed_from": resumed, "exit": status,
             "latest_after": _latest_step(run_dir)}
        )  # fmt: skip
        if kind == "none" and status != 0:
            raise RuntimeError(f"the last worker failed (exit {status}); see {workers.log}")
    return records


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # a finished worker is a zombie until the server reaps it: still "alive" here
    except ProcessLookupError:
        return False
    return True


def sweep_progress(runs_root: Path) -> int:
    """What a toy sweep has done so far: published checkpoints + finished runs + evaluated cells."""
    return (
        len(list(runs_root.glob("*/checkpoint-*")))
        + len(list(runs_root.glob("*/final.json")))
        + len(list(runs_root.glob("*/eval/*/*/results.json")))
    )


def killed_sweep(
    workers: Workers,
    out: Path,
    runs_root: Path,
    kills: Sequence[tuple[int, float]],
    *,
    seeds: Sequence[int] = (0, 1),
) -> list[dict[str, Any]]:
    """Run the toy sweep into ``out`` through killed workers, then once to the end.

    A kill (k, s): SIGKILL the worker s seconds after the sweep has made k more steps of progress
    (``sweep_progress``: a checkpoint published, a run finished, a cell evaluated), so that kills land
    inside the sweep whatever the machine's speed: in training, in saves, between a cell's evaluation and
    the scores' rewrite. k is capped to stay before the sweep's last step of progress. Returns one record
    per worker (its exit status, -9: killed, and what was done after it)."""
    total = 2 * len(seeds) * (STEPS // SAVE_STEPS + 1 + len(TASKS))  # 2 methods
    records = []
    for n, (events, delay) in enumerate([*kills, (None, 0.0)]):
        done = sweep_progress(runs_root)
        pid = workers.start(["sweep", str(out), str(runs_root), "--seeds", ",".join(map(str, seeds))])
        kill = ""
        if events is not None:
            target = min(done + events, total - 1)
            while sweep_progress(runs_root) < target and _alive(pid):
                time.sleep(0.001)
            time.sleep(delay)
            workers.kill(pid)
            kill = f"{target - done} more, +{delay:.3f} s"
        status = workers.wait(pid)
        rows = sum(1 for _ in (out / "scores.csv").open()) - 1 if (out / "scores.csv").is_file() else 0
        records.append({"worker": n, "kill": kill or "none", "exit": status, "progress_before": done,
                        "progress_after": sweep_progress(runs_root), "score_rows_after": rows})  # fmt: skip
        if events is None and status != 0:
            raise RuntimeError(f"the last sweep worker failed (exit {status}); see {workers.log}")
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability_toys")
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("serve")
    t = sub.add_parser("train")
    t.add_argument("run_dir")
    t.add_argument("--steps", type=int, default=STEPS)
    t.add_argument("--method", default="baseline", choices=("baseline", "stgc"))
    t.add_argument("--kill-in-save")
    s = sub.add_parser("sweep")
    s.add_argument("out")
    s.add_argument("runs_root")
    s.add_argument("--wait-for")
    s.add_argument("--seeds", default="0,1")
    args = parser.parse_args(argv)
    if args.what == "serve":
        return serve()
    if args.what == "train":
        if args.kill_in_save:
            _kill_in_save(args.kill_in_save)
        print("STARTED", flush=True)
        config = run_config(args.run_dir, steps=args.steps, method=args.method)
        print("FINAL", toy_train(config), flush=True)
        return 0
    import evals.run
    import evals.sweep as S
    from stgc.cli import main as stgc_main

    S.SWEEPS["toy"] = lambda: toy_sweep(args.runs_root, [int(s) for s in args.seeds.split(",")])
    S._default_train = toy_train
    evals.run.evaluate_each = toy_evaluate
    print("READY", flush=True)
    while args.wait_for and not Path(args.wait_for).exists():
        time.sleep(0.001)
    return stgc_main(["sweep", "toy", "--out", args.out, "--no-progress"])


if __name__ == "__main__":
    sys.exit(main())
