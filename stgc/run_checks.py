"""The checks before a run trains (``stgc.train.train`` makes them): a finished run's final checkpoint
(``finished_checkpoint``), an existing run folder holding the same run (``check_run_folder``, up to
``RESUMABLE_CHANGES``), and a checkpoint that a resume can read whole and that fits the model
(``check_checkpoint``); each refusal is a ``CheckpointError`` naming what is wrong and the ways out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stgc.callbacks import RUN_CONFIG_NAME
from stgc.checkpoints import (
    FINAL_NAME,
    CheckpointError,
    checkpoints_of,
    resume_requirements,
    verify_checkpoint,
)
from stgc.run_config import RunConfig

if TYPE_CHECKING:
    from torch import nn

# Settings that may change between an interrupted run and its resume (bookkeeping, not the trajectory).
RESUMABLE_CHANGES = (
    "output_dir",
    "training.save_steps",
    "training.save_total_limit",
    "training.logging_steps",
    "training.dataloader_workers",
    "training.deepspeed",
    "training.cpu_threads",
)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(saved: dict[str, Any], current: RunConfig, ignore: Sequence[str] = ()) -> list[str]:
    """``key: saved -> current`` for every setting that differs (JSON forms compared). The saved config is
    read through ``RunConfig`` first, so a field added since it was written counts with its default."""
    try:
        saved = json.loads(RunConfig.from_dict(saved).to_json())
    except (ValueError, TypeError):
        pass  # an older or foreign layout: compare as written
    a, b = _flat(saved), _flat(json.loads(current.to_json()))
    keys = sorted(set(a) | set(b))
    return [
        f"{k}: {a.get(k, '<missing>')!r} -> {b.get(k, '<missing>')!r}"
        for k in keys
        if a.get(k) != b.get(k) and k not in ignore
    ]


def _read_run_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is unreadable ({error}); the run folder is damaged.") from error


def check_run_folder(config: RunConfig) -> None:
    """An existing run folder must hold the same run (up to ``RESUMABLE_CHANGES``): resuming another
    run's checkpoints, or finishing a run with different settings, would mix two experiments."""
    path = config.run_dir / RUN_CONFIG_NAME
    if not path.exists():
        return
    diffs = config_differences(_read_run_config(path), config, RESUMABLE_CHANGES)
    if diffs:
        raise CheckpointError(
            f"{config.run_dir} holds a run with different settings ({'; '.join(diffs)}). Use another "
            "output_dir for this config, or delete the folder to start that run over."
        )


def check_checkpoint(
    folder: Path,
    config: RunConfig,
    model: nn.Module,
    *,
    required: Sequence[str] | None = None,
    reset_optimizer: bool = False,
    world_size: int = 1,
) -> None:
    """A checkpoint can be resumed: every file the resume reads is there and whole, and its tensors fit
    ``model``.

    required: the files to check (``stgc.checkpoints.resume_requirements``; default: a one-process run's).
        The checkpoint's manifest adds what it declares (e.g. an objective's state file).
    reset_optimizer: optimizer, scheduler and RNG state may be missing or damaged (they are rebuilt).
    Also: the checkpoint's run_config.json (if any) has the same model settings; every tensor name and
    shape matches the model's state dict. ``CheckpointError`` names what is wrong and the ways out."""
    from safetensors import safe_open

    folder = Path(folder)
    required = list(required) if required is not None else resume_requirements()
    problems = verify_checkpoint(folder, required, world_size=world_size)
    blocking = [p for p in problems if not (reset_optimizer and p.resettable)]
    if blocking:
        raise CheckpointError(_refusal(folder, blocking, required, world_size))
    saved_cfg = folder / RUN_CONFIG_NAME
    if saved_cfg.exists():
        saved = _read_run_config(saved_cfg)
        diffs = [d for d in config_differences(saved, config, RESUMABLE_CHANGES) if d.startswith("model.")]
        if diffs:
            raise CheckpointError(
                f"checkpoint {folder} was written by a run with another model ({'; '.join(diffs)}); it "
                "cannot be resumed with this config. Use another output_dir."
            )
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return  # a DeepSpeed / torch-format checkpoint: the Trainer's loader matches the tensors
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:  # whole: verify_checkpoint read its header
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = {k for k in expected if k not in shapes and k.endswith("lm_head.weight")}
    missing = sorted(set(expected) - set(shapes) - tied)
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(shapes) & set(expected) if shapes[k] != expected[k])
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {items[:3]}{' ...' if len(items) > 3 else ''}"
            for what, items in (("missing", missing), ("unexpected", unexpected), ("shape differs", wrong))
            if items
        )
        raise CheckpointError(
            f"checkpoint {folder} does not fit this model ({detail}); it was written by a run with another "
            "model shape. Use another output_dir for this config."
        )


def _refusal(folder: Path, problems: Sequence[Any], required: Sequence[str], world_size: int) -> str:
    """One line: what the checkpoint lacks, and the ways out (an earlier complete checkpoint; a fresh
    optimizer when only optimizer-like state is lacking)."""
    earlier = [c for c in checkpoints_of(folder.parent) if c != folder and _step(c) < _step(folder)]
    complete = next(
        (c for c in reversed(earlier) if not verify_checkpoint(c, required, world_size=world_size)), None
    )
    ways = []
    if complete is not None:
        ways.append(
            f"resume from the latest complete checkpoint, {complete.name} (`stgc train ... --resume-from "
            f"{complete.name}`; the steps after it are trained again)"
        )
    if all(p.resettable for p in problems):
        ways.append(
            "continue from this checkpoint's weights with a fresh optimizer (`--reset-optimizer`; the run "
            "then differs from an uninterrupted one)"
        )
    if not ways:
        ways.append("start the run over in another output_dir (no earlier checkpoint is complete)")
    return (
        f"checkpoint {folder} cannot be resumed: {'; '.join(str(p) for p in problems)}; a resume without "
        f"{'it' if len(problems) == 1 else 'them'} would not continue the run where it stopped. Either "
        f"{', or '.join(ways)}."
    )


def _step(folder: Path) -> int:
    return int(folder.name.rsplit("-", 1)[-1]) if folder.name.rsplit("-", 1)[-1].isdigit() else -1


def finished_checkpoint(config: RunConfig) -> Path | None:
    """The final checkpoint of a finished run in ``config.run_dir`` (None if not finished)."""
    marker = config.run_dir / FINAL_NAME
    if not marker.exists():
        return None
    try:
        final = config.run_dir / json.loads(marker.read_text())["checkpoint"]
    except (OSError, json.JSONDecodeError, KeyError) as error:
        raise CheckpointError(
            f"{marker} is unreadable ({error}); delete it to finish the run again."
        ) from error
    if not final.is_dir():
        raise CheckpointError(
            f"{marker} names {final.name}, which is missing; delete {marker} to finish the run again."
        )
    return final


def _resume_folder(run_dir: Path, resume_from: str | os.PathLike) -> Path:
    """The checkpoint folder ``resume_from`` names (``checkpoint-<step>`` or a path): one of this run's."""
    path = Path(resume_from)
    path = path if path.is_dir() else run_dir / path
    ours = checkpoints_of(run_dir)
    if path.resolve() not in {c.resolve() for c in ours}:
        names = [c.name for c in ours] or "none"
        raise CheckpointError(
            f"--resume-from {str(resume_from)!r} is not a checkpoint of {run_dir} (its checkpoints: "
            f"{names}); pass one of them."
        )
    return path
