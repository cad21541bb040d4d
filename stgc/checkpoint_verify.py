"""Verifying a checkpoint before a resume (``verify_checkpoint``): every file a resume reads is there and
whole. The files required are ``resume_requirements(...)``: trainer state, weights, optimizer and scheduler
state, the RNG state of every rank, plus names the caller passes (``extra=``, e.g. an objective's
``objectives_state.pt``) and names the checkpoint's manifest declares (``read_manifest``). Checks are
structural and cheap (no tensor is loaded): JSON parses, the safetensors header and data length, the zip
directory of torch files, and the sizes the manifest recorded. ``stgc.checkpoints`` writes the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MANIFEST_NAME = "stgc_checkpoint.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
SCALER = "scaler.pt"
# requirement tokens that stand for a set of files rather than one name
WEIGHTS = "<weights>"
DEEPSPEED_STATE = "<deepspeed engine and optimizer state>"
# what --reset-optimizer rebuilds instead of loading (never the weights or the trainer state)
RESETTABLE = re.compile(r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth|<deepspeed .*>)$")


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(folder) / MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def resume_requirements(
    *, world_size: int = 1, deepspeed: bool = False, fp16: bool = False, extra: Sequence[str] = ()
) -> list[str]:
    """The files a resume reads: trainer state, weights, optimizer (DeepSpeed: its engine folder), scheduler,
    the RNG state of every rank (what the Trainer saves and loads), the fp16 scaler, and ``extra`` (files a
    caller's own state needs, e.g. ``objectives_state.pt`` for stateful objectives)."""
    required = [TRAINER_STATE, WEIGHTS, DEEPSPEED_STATE if deepspeed else OPTIMIZER, SCHEDULER]
    if world_size > 1:
        required += [f"rng_state_{r}.pth" for r in range(world_size)]
    else:
        required.append("rng_state.pth")
    if fp16 and not deepspeed:
        required.append(SCALER)
    return list(dict.fromkeys([*required, *extra]))


@dataclasses.dataclass(frozen=True)
class Problem:
    """One required file that is missing or damaged."""

    name: str
    reason: str

    @property
    def resettable(self) -> bool:
        return bool(RESETTABLE.match(self.name))

    def __str__(self) -> str:
        return f"{self.name} {self.reason}"


def verify_checkpoint(
    folder: str | os.PathLike, required: Sequence[str], *, world_size: int = 1
) -> list[Problem]:
    """The problems of ``folder`` as a checkpoint to resume: every name of ``required``
    (``resume_requirements``) and of the manifest's ``required`` must be there and whole, and every file the
    manifest lists must have the size it was written with. Empty when the checkpoint can be resumed."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    names = list(dict.fromkeys([*required, *((manifest or {}).get("required") or [])]))
    problems: list[Problem] = []
    for name in names:
        if name == WEIGHTS:
            problems += _check_weights(folder)
        elif name == DEEPSPEED_STATE:
            problems += _check_deepspeed(folder, world_size)
        else:
            problem = _check_file(folder, name)
            if problem is not None:
                problems.append(problem)
    seen = {p.name for p in problems}
    for rel, size in ((manifest or {}).get("files") or {}).items():
        path = folder / rel
        if rel in seen or not path.is_file():
            continue  # missing files count only when required (above)
        actual = path.stat().st_size
        if actual != size:
            problems.append(
                Problem(rel, f"is truncated or changed ({actual} bytes; it was written with {size})")
            )
    return problems


def _check_file(folder: Path, name: str) -> Problem | None:
    path = folder / name
    if not path.is_file():
        return Problem(name, "is missing")
    if path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return Problem(name, f"is unreadable ({err})")
        return None
    if path.suffix in (".pt", ".pth", ".bin"):
        reason = torch_file_problem(path)
        return Problem(name, reason) if reason else None
    if path.suffix == ".safetensors":
        reason = safetensors_problem(path)
        return Problem(name, reason) if reason else None
    return None if path.stat().st_size > 0 else Problem(name, "is empty")


def torch_file_problem(path: Path) -> str | None:
    """Why a ``torch.save`` file is not whole, or None. torch writes a zip archive whose directory is at the
    end, so a truncated file has none; every member must also lie inside the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # the legacy (pre-1.6) pickle format: only a full load can tell
        try:
            import torch

            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure to read means a damaged file
            return f"is corrupt or truncated ({type(err).__name__}: {' '.join(str(err).split())[:120]})"
        return None
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"is corrupt or truncated ({size} bytes; member {info.filename} ends beyond it)"
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        return f"is corrupt or truncated ({size} bytes: {err})"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole, or None: its header parses and its data section is all there
    (safetensors reads the data lazily, so a truncated file would load and fail later)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"is corrupt or truncated ({size} bytes, no header)"
            header_len = int.from_bytes(head, "little")
            if 8 + header_len > size:
                return f"is corrupt or truncated ({size} bytes; its header alone needs {8 + header_len})"
            header = json.loads(fh.read(header_len))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"is corrupt or truncated ({type(err).__name__}: {err})"
    needed = 8 + header_len + max(ends, default=0)
    if needed > size:
        return f"is corrupt or truncated ({size} bytes, its header needs {needed})"
    return None


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder (a sharded index's shards, or the single file)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError, AttributeError):
                return [index]
            return [index, *(folder / s for s in shards)]
    return [p for p in (folder / "model.safetensors", folder / "pytorch_model.bin") if p.is_file()]


def _check_weights(folder: Path) -> list[Problem]:
    files = weight_files(folder)
    if not files:
        return [Problem("model.safetensors", "is missing (no model weights)")]
    problems = []
    for path in files:
        problem = _check_file(folder, path.name)
        if problem is not None:
            problems.append(problem)
    return problems


def _check_deepspeed(folder: Path, world_size: int) -> list[Problem]:
    """DeepSpeed's engine checkpoint: ``latest`` names the tag folder, which holds the model states and one
    ZeRO optimizer partition per data-parallel rank."""
    latest = folder / "latest"
    if not latest.is_file():
        return [Problem("latest", "is missing (DeepSpeed's engine and optimizer state)")]
    tag = latest.read_text().strip()
    engine = folder / tag
    if not tag or not engine.is_dir():
        return [Problem(f"{tag or 'latest'}/", "is missing (DeepSpeed's engine and optimizer state)")]
    problems = []
    model_states = sorted(engine.glob("*model_states.pt"))
    if not model_states:
        problems.append(Problem(f"{tag}/mp_rank_00_model_states.pt", "is missing"))
    for rank in range(world_size):
        parts = sorted(engine.glob(f"*zero_pp_rank_{rank}_mp_rank_*optim_states.pt"))
        if not parts:
            problems.append(Problem(f"{tag}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", "is missing"))
    for path in [*model_states, *sorted(engine.glob("*optim_states.pt"))]:
        reason = torch_file_problem(path)
        if reason:
            problems.append(Problem(f"{tag}/{path.name}", reason))
    return problems
