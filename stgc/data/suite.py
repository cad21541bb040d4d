"""``generate_suite``: the mini benchmarks, the training mixture and the tokenizer, written atomically.

Layout of ``out`` (each dataset a ``DatasetDict.save_to_disk`` folder):
    <name>/      one per benchmark, split = the lmms-eval task's test split (validation, testdev, ...)
    train/       split "train": id, image, conversations, benchmark, answer_format
    tokenizer/   PreTrainedTokenizerFast (save_pretrained)
    _SUITE.json  parameters and row counts; written last, so its presence means the suite is complete

Everything is first written to a hidden sibling folder and renamed into place, so an interrupted run never
leaves a folder at ``out`` that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, load_from_disk

from stgc.data.generate import eval_rows
from stgc.data.mixture import build_mixture, mixture_dataset
from stgc.data.params import DEFAULTS, resolve_benchmarks, validate_params
from stgc.data.registry import check_schema, get_spec
from stgc.data.tokenizer import train_tokenizer

MARKER = "_SUITE.json"
# Bumped whenever the same parameters would generate other rows (2: POPE training images ask six
# existence questions); a suite written by another version is refused with the command that regenerates it.
GENERATOR_VERSION = 2


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder; choose another path")
    if not any(out.iterdir()):
        return
    if not (out / MARKER).exists():
        raise ValueError(
            f"--out {out} already holds files but no {MARKER} (not a mini suite); refusing to replace it, "
            "even with --overwrite. Choose an empty or new folder."
        )
    if not overwrite:
        raise ValueError(f"--out {out} already holds a mini suite; pass --overwrite to replace it")


def _remove_stale_temps(out: Path) -> None:
    """Delete temp folders left by killed runs (their pid is gone); live ones belong to other runs."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(tmp.name.split(".tmp-")[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def _save(dataset: DatasetDict, path: Path) -> None:
    dataset.save_to_disk(str(path))


def generate_suite(
    out: str | Path,
    *,
    docs: int = DEFAULTS["docs"],
    train_size: int = DEFAULTS["train_size"],
    image_size: int = DEFAULTS["image_size"],
    seed: int = DEFAULTS["seed"],
    benchmarks: list[str] | None = None,
    overwrite: bool = False,
    vocab_size: int = DEFAULTS["vocab_size"],
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Generate the mini suite into ``out`` and return the contents of its ``_SUITE.json``.

    docs: evaluation rows per benchmark (MME rounds up to whole yes/no pairs, MMBench to whole groups of
        4 circular rotations). train_size: training conversations (0: no train set and no tokenizer).
    Raises ValueError for unknown benchmarks, out-of-range sizes and an occupied ``out``.
    """
    validate_params(docs=docs, train_size=train_size, image_size=image_size, seed=seed, vocab_size=vocab_size)
    names = resolve_benchmarks(benchmarks)
    out = Path(out).absolute()
    _check_target(out, overwrite)
    say = log or (lambda _msg: None)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    bars_were_off = datasets.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()  # one line per benchmark instead of three progress bars
    try:
        tmp.mkdir()
        info: dict[str, Any] = {
            "format": "stgc-mini-suite",
            "generator_version": GENERATOR_VERSION,
            "params": {
                "docs": docs,
                "train_size": train_size,
                "image_size": image_size,
                "seed": seed,
                "vocab_size": vocab_size,
                "benchmarks": names,
            },  # fmt: skip
            "benchmarks": {},
        }
        eval_hashes: set[str] = set()
        for name in names:
            spec = get_spec(name)
            rows, hashes = eval_rows(name, docs, seed, image_size)
            eval_hashes |= hashes
            ds = DatasetDict({spec.split: Dataset.from_list(rows, features=spec.features)})
            check_schema(name, ds)
            _save(ds, tmp / name)
            info["benchmarks"][name] = {
                "lmms_task": spec.lmms_task,
                "split": spec.split,
                "rows": len(rows),
                "images": len(hashes),
            }
            say(f"{name:>14}: {len(rows)} rows, {len(hashes)} images ({time.perf_counter() - t0:.1f} s)")
        if train_size > 0:
            mix = build_mixture(names, train_size, seed, image_size, exclude=eval_hashes)
            _save(DatasetDict({"train": mixture_dataset(mix)}), tmp / "train")
            formats: dict[str, int] = {}
            for r in mix:
                formats[r["answer_format"]] = formats.get(r["answer_format"], 0) + 1
            info["train"] = {
                "split": "train",
                "rows": len(mix),
                "answer_formats": dict(sorted(formats.items())),
            }
            say(f"{'train':>14}: {len(mix)} conversations ({time.perf_counter() - t0:.1f} s)")
            tokenizer = train_tokenizer(_corpus(mix), vocab_size=vocab_size)
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
            info["tokenizer"] = {"vocab_size": len(tokenizer), "path": "tokenizer"}
            say(f"{'tokenizer':>14}: {len(tokenizer)} tokens ({time.perf_counter() - t0:.1f} s)")
        info["seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        _swap_into_place(tmp, out)
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return info


def _corpus(mix: list[dict[str, Any]]) -> list[str]:
    """Tokenizer training text: every training conversation as the chat template renders it."""
    texts = []
    for row in mix:
        parts = []
        for turn in row["conversations"]:
            if turn["from"] == "human":
                parts.append(f"USER: {turn['value']} ")
            else:
                parts.append(f"ASSISTANT: {turn['value']}</s>")
        texts.append("".join(parts))
    return texts


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Atomic on one filesystem: ``out`` is either the old suite or the new one, never a partial one."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def read_suite_info(root: str | Path) -> dict[str, Any]:
    """The ``_SUITE.json`` of a complete suite; ValueError if ``root`` is not one (or is incomplete)."""
    marker = Path(root) / MARKER
    if not marker.exists():
        raise ValueError(
            f"{root} is not a complete mini suite (no {MARKER}); generate it with `stgc data --out {root}`"
        )
    info = json.loads(marker.read_text())
    version = info.get("generator_version")
    if version != GENERATOR_VERSION:
        raise ValueError(
            f"{root} was generated by mini-suite generator version {version}, this code writes version "
            f"{GENERATOR_VERSION} (its rows may differ); regenerate it: "
            f"`{regenerate_command(root, info.get('params', {}))}`"
        )
    return info


def check_generated_suite(path: str | Path) -> None:
    """Refuse (ValueError, with the command that regenerates it) a generated mini suite written by another
    generator version, given its root or its ``train/`` folder; anything else (a hand-made folder, a
    LLaVA JSON file, a hub dataset) passes untouched."""
    path = Path(path)
    for root in (path, path.parent) if path.name == "train" else (path,):
        if (root / MARKER).exists():
            read_suite_info(root)
            return


def regenerate_command(root: str | Path, params: dict[str, Any]) -> str:
    """The ``stgc data`` command that writes a suite with ``params`` (a ``_SUITE.json``'s) into ``root``."""
    flags = [f"--out {root}"]
    for key, flag in (
        ("docs", "--docs"),
        ("train_size", "--train-size"),
        ("image_size", "--image-size"),
        ("seed", "--seed"),
        ("vocab_size", "--vocab-size"),
    ):
        if key in params:
            flags.append(f"{flag} {params[key]}")
    names = params.get("benchmarks")
    if names and sorted(names) != sorted(resolve_benchmarks(None)):
        flags.append("--benchmarks " + " ".join(names))
    return "stgc data " + " ".join(flags) + " --overwrite"


def load_benchmark(root: str | Path, name: str) -> Dataset:
    """The evaluation split of benchmark ``name`` from a suite folder, schema-checked."""
    spec = get_spec(name)
    info = read_suite_info(root)
    if name not in info["benchmarks"]:
        raise ValueError(
            f"suite {root} holds {sorted(info['benchmarks'])}, not {name!r}; regenerate with it included"
        )
    ds = load_from_disk(str(Path(root) / name))
    check_schema(name, ds)
    return ds[spec.split]


def load_train(root: str | Path) -> Dataset:
    info = read_suite_info(root)
    if "train" not in info:
        raise ValueError(f"suite {root} was generated with train_size=0; it has no training mixture")
    return load_from_disk(str(Path(root) / "train"))["train"]
