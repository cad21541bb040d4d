"""Names, defaults and valid ranges of the suite parameters (no heavy imports: ``stgc data --help`` and
argument checking stay instant)."""

from __future__ import annotations

from typing import Any

BENCHMARK_NAMES: tuple[str, ...] = (
    "vqav2",
    "gqa",
    "vizwiz",
    "scienceqa_img",
    "textvqa",
    "chartqa",
    "docvqa",
    "pope",
    "mme",
    "mmbench",
)
# The test split each lmms-eval task reads (registry.BenchmarkSpec.split; here so that the evaluation side
# can name them without importing the generators).
SPLITS: dict[str, str] = {
    "vqav2": "validation", "gqa": "testdev", "vizwiz": "val", "scienceqa_img": "test",
    "textvqa": "validation", "chartqa": "test", "docvqa": "validation", "pope": "test", "mme": "test",
    "mmbench": "dev",
}  # fmt: skip
POPE_CATEGORIES: tuple[str, ...] = ("adversarial", "popular", "random")
DEFAULTS: dict[str, Any] = {"docs": 200, "train_size": 4000, "image_size": 224, "seed": 0, "vocab_size": 3000}
LIMITS: dict[str, tuple[int, int]] = {
    "docs": (1, 100_000),
    "train_size": (0, 1_000_000),
    "image_size": (64, 2048),
    "seed": (0, 2**32 - 1),
    "vocab_size": (300, 100_000),
}
_WHY = {"image_size": " (below 64 px, text and shapes are no longer legible)"}


def validate_params(**params: Any) -> None:
    """Raise ``ValueError`` naming the parameter (and its CLI flag), its value and the valid range."""
    for key, value in params.items():
        lo, hi = LIMITS[key]
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            flag = "--" + key.replace("_", "-")
            raise ValueError(
                f"{key} ({flag}) = {value!r} is out of range: "
                f"use an integer in [{lo}, {hi}]{_WHY.get(key, '')}"
            )


def resolve_benchmarks(benchmarks: list[str] | None) -> list[str]:
    """The benchmarks to generate, in registry order of first mention; unknown names raise ValueError."""
    if not benchmarks:
        return list(BENCHMARK_NAMES)
    unknown = [b for b in benchmarks if b not in BENCHMARK_NAMES]
    if unknown:
        raise ValueError(f"unknown mini benchmark(s) {unknown}; valid names: {', '.join(BENCHMARK_NAMES)}")
    return list(dict.fromkeys(benchmarks))
