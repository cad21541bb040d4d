"""What every mini-benchmark generator returns, and the answer-annotation helpers they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

# The post-prompts lmms-eval 0.7.3 appends by default (read from each task's YAML).
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."
SINGLE_WORD = "\nAnswer the question with a single word."
VIZWIZ_POST = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT_ANSWER
MME_SUFFIX = " Please answer yes or no."


@dataclass
class Unit:
    """One image and the evaluation rows asked about it (each row lacks only the ``image`` column).

    ``caption`` is a free-text description used only by the training mixture ("" when none).
    """

    image: Image.Image
    rows: list[dict[str, Any]]
    caption: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def annotator_answers(rng: np.random.Generator, gold: str, alternatives: list[str], n: int = 10) -> list[str]:
    """``n`` crowd answers: the gold answer at least 7 times (so it scores 1.0 under VQA accuracy, which
    needs >= 3 matches among the other 9), the rest drawn from plausible wrong ``alternatives``.

    Real VQAv2/VizWiz/TextVQA annotators disagree in about a third of the questions; a little disagreement
    keeps the soft accuracy meaningful for near-miss answers.
    """
    k = int(rng.integers(7, n + 1))
    alts = [a for a in alternatives if a != gold]
    answers = [gold] * k
    if alts:
        answers += [alts[int(rng.integers(len(alts)))] for _ in range(n - k)]
    else:
        answers += [gold] * (n - k)
    order = rng.permutation(n)
    return [answers[i] for i in order]


def fmt_number(x: float) -> str:
    """Numbers the way ChartQA / DocVQA write them: no trailing '.0', at most two decimals."""
    if float(x).is_integer():
        return str(int(x))
    return f"{x:.2f}".rstrip("0").rstrip(".")
