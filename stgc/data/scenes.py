"""The object distribution of the shape scenes, and the statistics POPE needs from it.

POPE (Li et al. 2023) draws its negatives three ways: uniformly among absent objects (random), the most
frequent objects of the dataset (popular), and the objects that most often co-occur with the present
ones (adversarial). For the last two to differ from random, scenes here are not uniform: shapes have a
Zipf-like frequency and belong to themes whose members tend to appear together.
"""

from __future__ import annotations

import functools

import numpy as np

from stgc.data.render import SHAPES

# Themes: members co-occur (70% of a scene's objects come from its theme).
THEMES: tuple[tuple[str, ...], ...] = (
    ("circle", "heart", "hexagon"),
    ("square", "diamond", "cross"),
    ("triangle", "star", "arrow", "pentagon"),
)
# Zipf-like base frequency over SHAPES order (circle most common, arrow least).
_BASE = np.array([1.0 / (k + 1) ** 0.7 for k in range(len(SHAPES))])
_THEME_SHARE = 0.7


def sample_shapes(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct shape names drawn from the theme-and-frequency prior."""
    theme = THEMES[int(rng.integers(len(THEMES)))]
    in_theme = np.array([s in theme for s in SHAPES])
    w_in, w_out = _BASE * in_theme, _BASE * ~in_theme
    weights = _THEME_SHARE * w_in / w_in.sum() + (1 - _THEME_SHARE) * w_out / w_out.sum()
    idx = rng.choice(len(SHAPES), size=n, replace=False, p=weights)
    return [SHAPES[i] for i in idx]


@functools.lru_cache(maxsize=1)
def pope_statistics(samples: int = 4000) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """Frequency of each shape and co-occurrence of each pair, estimated on a fixed reference sample of
    scenes (seed 0, independent of any suite seed), as POPE estimates them on its dataset's annotations."""
    rng = np.random.default_rng(0)
    freq = dict.fromkeys(SHAPES, 0.0)
    co: dict[tuple[str, str], float] = {}
    for _ in range(samples):
        present = sample_shapes(rng, int(rng.integers(3, 7)))
        for a in present:
            freq[a] += 1
            for b in present:
                if a != b:
                    co[(a, b)] = co.get((a, b), 0.0) + 1
    return {k: v / samples for k, v in freq.items()}, {k: v / samples for k, v in co.items()}


def pope_negative(rng: np.random.Generator, present: list[str], category: str) -> str:
    """An absent shape chosen the POPE way for ``category`` in {random, popular, adversarial}."""
    absent = [s for s in SHAPES if s not in present]
    freq, co = pope_statistics()
    if category == "random":
        return absent[int(rng.integers(len(absent)))]
    if category == "popular":
        return max(absent, key=lambda s: (freq[s], s))
    if category == "adversarial":
        return max(absent, key=lambda s: (sum(co.get((p, s), 0.0) for p in present), s))
    raise AssertionError(f"unknown POPE category {category!r}")


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def describe(objects: list[tuple[str, str]]) -> str:
    """A one-sentence caption for free-text training turns: 'A red circle, a blue star and a green cross.'"""
    names = [f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}" for color, shape in objects]
    if len(names) == 1:
        body = names[0]
    else:
        body = ", ".join(names[:-1]) + " and " + names[-1]
    return body[0].upper() + body[1:] + "."
