"""Drive a benchmark's generator: per-unit random streams, row counts, and train/eval image disjointness.

Every unit (one image and its questions) draws from its own stream
``default_rng([seed, crc32(benchmark), split, unit])``, so a benchmark's rows do not depend on which other
benchmarks are generated, nor on the order or the process that generates them.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from stgc.data.common import Unit
from stgc.data.registry import get_spec
from stgc.data.render import image_hash

SPLIT_STREAMS = {"eval": 0, "train": 1}
MAX_UNITS = 1_000_000  # MMBench's circular index stride bounds the units of one benchmark


def unit_rng(seed: int, name: str, split: str, unit: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), SPLIT_STREAMS[split], unit])


def iter_units(
    name: str, seed: int, image_size: int, split: str, exclude: set[str] | None = None
) -> Iterator[tuple[int, Unit, str]]:
    """Yield (unit index, unit, image hash) forever, skipping units whose image hash is in ``exclude``
    (the training stream skips any image that also appears in an evaluation set)."""
    spec = get_spec(name)
    for unit in range(MAX_UNITS):
        u = spec.make_unit(unit_rng(seed, name, split, unit), unit, image_size)
        h = image_hash(u.image)
        if exclude is not None and h in exclude:
            continue
        yield unit, u, h
    raise AssertionError(f"{name}: ran out of units")


def eval_rows(name: str, docs: int, seed: int, image_size: int) -> tuple[list[dict[str, Any]], set[str]]:
    """The evaluation rows of ``name`` (``docs`` rows; whole groups for MME / MMBench, so possibly up to
    one group more) and the hashes of their images."""
    spec = get_spec(name)
    rows: list[dict[str, Any]] = []
    hashes: set[str] = set()
    for _, unit, h in iter_units(name, seed, image_size, "eval"):
        take = unit.rows if spec.whole_units else unit.rows[: docs - len(rows)]
        rows.extend({**r, "image": unit.image} for r in take)
        hashes.add(h)
        if len(rows) >= docs:
            return rows, hashes
    raise AssertionError("unreachable")
