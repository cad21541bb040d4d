"""Checkpoints that are complete or absent: atomic writing, verification before a resume, identity.

Writing (``AtomicCheckpointMixin``, mixed into the Trainer subclass): transformers'
``Trainer._save_checkpoint`` (5.x) writes straight into ``<run>/checkpoint-<step>/``, so a kill during a save
leaves a partial folder that ``get_last_checkpoint`` then picks as the latest. The mixin points that save at
a staging folder, ``<run>/.checkpoint-staging/checkpoint-<step>/``, writes the files of its callbacks
(``run_config.json``) and a manifest (``stgc_checkpoint.json``: every file with its size, and the files a
resume requires) there, flushes them to disk, and renames the folder into place: the latest checkpoint is
the previous complete one until the rename, the new complete one after it. Everything else is the
Trainer's own save.

Verifying (``verify_checkpoint``, in ``stgc.checkpoint_verify`` and importable from here): every file a
resume reads is there and whole (``resume_requirements(...)`` and what the checkpoint's manifest declares),
checked structurally and cheaply, without loading a tensor.

Identity (``checkpoint_identity``): the step and a content hash (SHA-256 of the model's files: config and
weights), which evaluation results record so that a sweep uses only its run's final checkpoint's results.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stgc.checkpoint_verify import (
    DEEPSPEED_STATE,
    MANIFEST_NAME,
    OPTIMIZER,
    RESETTABLE,
    SCALER,
    SCHEDULER,
    TRAINER_STATE,
    WEIGHTS,
    Problem,
    read_manifest,
    resume_requirements,
    safetensors_problem,
    torch_file_problem,
    verify_checkpoint,
    weight_files,
)

FINAL_NAME = "final.json"  # written by stgc.train when a run has finished: {"checkpoint": name, ...}
STAGING_NAME = ".checkpoint-staging"
_STEP = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A run folder or checkpoint cannot be resumed (incomplete, corrupt, or written by a different run)."""


# --------------------------------------------------------------------------------------------------------
# small atomic writes


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a kill leaves the old or the new."""
    path = Path(path)
    # not mkstemp: its 0600 mode would make run_config.json & co. unreadable to the user's group
    tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with tmp.open("x") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_tree(folder: Path) -> None:
    """Flush every file and the folders to disk: the rename that publishes a checkpoint must not survive a
    power loss that its files do not (a kill alone never loses written data)."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in [*sorted(p for p in folder.rglob("*") if p.is_dir()), folder]:
        _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staged: Path, final: Path) -> None:
    """Rename the complete folder ``staged`` to ``final``. A folder already at ``final`` (a checkpoint of the
    same step left by an earlier attempt: the run was resumed from an earlier checkpoint) is moved aside
    first and deleted after; a kill between the two renames leaves the previous checkpoint as the latest."""
    _fsync_tree(staged)
    old = None
    if final.exists():
        old = final.parent / f"{STAGING_NAME}-replaced-{final.name}-{os.getpid()}"
        os.rename(final, old)
    os.rename(staged, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard_staging(run_dir: str | os.PathLike) -> None:
    """Delete what killed saves left behind (the staging folder and replaced checkpoints): never a
    complete checkpoint, only folders that were never published or were already superseded."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for path in run_dir.glob(f"{STAGING_NAME}*"):
        shutil.rmtree(path, ignore_errors=True)


def write_manifest(folder: Path, step: int, required: Iterable[str] | None = None) -> None:
    """``stgc_checkpoint.json``: every file of ``folder`` with its size, and the files a resume requires
    (default: every one of them, so that a resume restores the checkpoint as it was written or refuses)."""
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    required = files if required is None else required
    manifest = {"format": 1, "step": step, "files": files, "required": sorted(set(required))}
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------------
# a run's checkpoints


def checkpoint_step(folder: str | os.PathLike) -> int | None:
    """The optimizer step of a checkpoint: its trainer state's, else its folder name's (checkpoint-N)."""
    folder = Path(folder)
    try:
        return int(json.loads((folder / TRAINER_STATE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        match = _STEP.match(folder.name)
        return int(match.group(1)) if match else None


def final_checkpoint_of(run_dir: str | os.PathLike) -> Path | None:
    """The final checkpoint a finished run names in its final.json, or None (not finished, or the file or
    the folder it names is unreadable / missing: ``stgc.run_checks.finished_checkpoint`` says which)."""
    run_dir = Path(run_dir)
    try:
        path = run_dir / json.loads((run_dir / FINAL_NAME).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if path.is_dir() else None


def checkpoints_of(run_dir: str | os.PathLike) -> list[Path]:
    """The published checkpoint folders of a run, by step (oldest first)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found)]


# --------------------------------------------------------------------------------------------------------
# identity


_HASHES: dict[tuple, str] = {}


def model_files(folder: Path) -> list[Path]:
    """The files that define the model a checkpoint evaluates as: its config and weights."""
    return sorted({folder / "config.json", *weight_files(folder)} & {p for p in folder.iterdir()})


def content_hash(folder: str | os.PathLike) -> str:
    """SHA-256 (first 16 hex digits) of the checkpoint's model files (names and bytes). Equal weights give
    equal hashes whatever the trainer state says (a resumed run's final checkpoint hashes like an
    uninterrupted one's). Cached in this process by the files' sizes and modification times."""
    folder = Path(folder).resolve()
    files = model_files(folder) if folder.is_dir() else []
    key = (str(folder), *((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if key not in _HASHES:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
        _HASHES[key] = digest.hexdigest()[:16]
    return _HASHES[key]


def checkpoint_identity(folder: str | os.PathLike) -> dict[str, Any]:
    """``{"checkpoint_step": int | None, "checkpoint_hash": str}`` of a checkpoint folder."""
    return {"checkpoint_step": checkpoint_step(folder), "checkpoint_hash": content_hash(folder)}


# --------------------------------------------------------------------------------------------------------
# the Trainer mixin


class AtomicCheckpointMixin:
    """Mixed into a ``transformers.Trainer`` subclass (before ``Trainer`` in the bases):

    - ``_save_checkpoint`` writes into the staging folder and publishes it (module docstring). Before the
      rename, every callback with a ``write_into_checkpoint(args, state, folder)`` method writes its files
      into the staged folder (``stgc.callbacks.RunConfigCallback``; the hook for any state that must be in
      every checkpoint), then the manifest lists them all.
    - the manifest declares every file of the checkpoint required for a resume, plus
      ``checkpoint_required`` (names that must be there even if their writer failed, e.g.
      ``objectives_state.pt``; set it on the trainer before ``train()``).
    - ``reset_optimizer``: on resume, load weights and trainer state only; the optimizer starts fresh, the
      learning-rate schedule is advanced to the checkpoint's step, and an RNG state is loaded only if whole.
    - loading a checkpoint's optimizer / scheduler / RNG state that fails is a ``CheckpointError`` line,
      not a torch traceback.
    """

    checkpoint_required: tuple[str, ...] = ()
    reset_optimizer: bool = False
    _staging_root: str | None = None

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)  # type: ignore[misc]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        args, state = self.args, self.state  # type: ignore[attr-defined]
        run_dir = Path(super()._get_output_dir(trial))  # type: ignore[misc]
        name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        staging_root = run_dir / STAGING_NAME
        staged = staging_root / name
        if args.should_save and staged.exists():
            shutil.rmtree(staged)  # left by a save that was killed
        self._barrier()
        self._staging_root = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self._staging_root = None
        self._barrier()  # every rank has written its files (RNG state, DeepSpeed partitions)
        if args.should_save:
            for callback in self.callback_handler.callbacks:  # type: ignore[attr-defined]
                write = getattr(callback, "write_into_checkpoint", None)
                if write is not None:
                    write(args, state, staged)
            # every file written is required by a resume, and so are names the run declares (a state file
            # whose writer failed would otherwise just be absent)
            files = [str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()]
            write_manifest(staged, state.global_step, [*files, *self.checkpoint_required])
            publish(staged, run_dir / name)
            with contextlib.suppress(OSError):
                staging_root.rmdir()  # empty now; another rank's or a killed save's files keep it
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=args.save_total_limit,
                best_model_checkpoint=state.best_model_checkpoint,
                use_mtime=True,
            )
        self._barrier()

    def _barrier(self) -> None:
        if self.args.world_size > 1:  # type: ignore[attr-defined]
            self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if self.reset_optimizer:
            # a fresh optimizer; the schedule continues at the checkpoint's step (a restarted warmup and
            # cosine would train with other rates than the run's)
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
                for _ in range(self.state.global_step):  # type: ignore[attr-defined]
                    self.lr_scheduler.step()  # type: ignore[attr-defined]
            return
        try:
            super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        except Exception as err:  # noqa: BLE001 - whatever torch raises, the user gets one line
            raise _load_error(checkpoint, "optimizer / scheduler state", err) from err

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is not None and self.reset_optimizer:
            world = self.args.world_size  # type: ignore[attr-defined]
            name = f"rng_state_{self.args.process_index}.pth" if world > 1 else "rng_state.pth"  # type: ignore[attr-defined]
            if not (Path(checkpoint) / name).is_file() or torch_file_problem(Path(checkpoint) / name):
                return  # reset: an unusable RNG state is skipped, like the optimizer's
        try:
            super()._load_rng_state(checkpoint)  # type: ignore[misc]
        except Exception as err:  # noqa: BLE001
            raise _load_error(checkpoint, "RNG state", err) from err


def _load_error(checkpoint: str, what: str, err: BaseException) -> CheckpointError:
    detail = " ".join(str(err).split())[:200]
    return CheckpointError(
        f"checkpoint {checkpoint}: its {what} cannot be loaded ({type(err).__name__}: {detail}). Resume from "
        "an earlier complete checkpoint (`stgc train ... --resume-from checkpoint-<step>`), or continue from "
        "this one's weights with a fresh optimizer (`--reset-optimizer`)."
    )


__all__ = [
    "AtomicCheckpointMixin",
    "CheckpointError",
    "DEEPSPEED_STATE",
    "FINAL_NAME",
    "MANIFEST_NAME",
    "OPTIMIZER",
    "Problem",
    "RESETTABLE",
    "SCALER",
    "SCHEDULER",
    "STAGING_NAME",
    "TRAINER_STATE",
    "WEIGHTS",
    "atomic_write_text",
    "checkpoint_identity",
    "checkpoint_step",
    "checkpoints_of",
    "content_hash",
    "discard_staging",
    "final_checkpoint_of",
    "publish",
    "read_manifest",
    "resume_requirements",
    "safetensors_problem",
    "torch_file_problem",
    "verify_checkpoint",
    "weight_files",
    "write_manifest",
]
