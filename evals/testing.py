"""Test doubles for the evaluation adapter: a scripted lmms-eval model and a tiny suite in the real schema.

`write_tiny_suite` writes a few rows per benchmark through the mini suite's own generators (the columns and
splits of the lmms-lab datasets), small and fast enough for the adapter tests. `ScriptedModel` answers every
request with `reply(task, doc)`, which lets a test score known predictions through the whole pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict

from evals.tasks import MINI_SPLITS as SPLITS
from evals.tasks import POPE_CATEGORIES


def write_tiny_suite(
    root: str | Path, n: int = 6, seed: int = 0, names: list[str] | None = None, image_size: int = 64
) -> Path:
    """Write a few rows of each benchmark under `root/<name>/` (`save_to_disk`) with the mini suite's own
    generators (`stgc.data.BENCHMARKS`), so the schema has one definition: `n` rows per benchmark (POPE:
    n per category; MME: n image pairs; MMBench: n questions x 4 rotations). Returns `root`."""
    from stgc.data import BENCHMARKS

    root = Path(root)
    rng = np.random.default_rng(seed)
    for name in names or list(SPLITS):
        if name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
        spec = BENCHMARKS[name]
        rows: list[dict[str, Any]] = []
        per_group: dict[str, int] = {}
        unit = 0
        while True:
            u = spec.make_unit(rng, unit, image_size)
            unit += 1
            if spec.whole_units:  # MME pairs / MMBench rotations stay whole
                rows += [{**r, "image": u.image} for r in u.rows]
                if unit >= n:
                    break
                continue
            for r in u.rows:
                group = r.get("category", "") if name == "pope" else ""
                if per_group.get(group, 0) < n:
                    per_group[group] = per_group.get(group, 0) + 1
                    rows.append({**r, "image": u.image})
            groups = len(POPE_CATEGORIES) if name == "pope" else 1
            if len(per_group) == groups and all(c >= n for c in per_group.values()):
                break
        data = Dataset.from_list(rows, features=spec.features)
        DatasetDict({SPLITS[name]: data}).save_to_disk(str(root / name))
    return root


def scripted_model_class():
    """The `ScriptedModel` class (built lazily: importing lmms_eval costs seconds)."""
    from lmms_eval.api.model import lmms

    class ScriptedModel(lmms):
        """An lmms-eval model whose reply to a generation request is `reply(task, doc)`."""

        def __init__(self, reply: Callable[[str, dict[str, Any]], str]) -> None:
            super().__init__()
            self.reply = reply

        def generate_until(self, requests) -> list[str]:
            out = []
            for request in requests:
                _, _, _, doc_id, task, split = request.args
                out.append(self.reply(task, self.task_dict[task][split][doc_id]))
            return out

        def loglikelihood(self, requests):
            raise NotImplementedError("ScriptedModel only generates")

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("ScriptedModel only generates")

    return ScriptedModel


def write_tiny_checkpoint(
    path: str | Path,
    seed: int = 0,
    backbone: str = "llama",
    chat_template: str | None = None,
    **moe_kwargs: Any,
) -> Path:
    """A randomly initialised tiny checkpoint folder (model, tokenizer with the project's chat template, or
    the `stgc.data.chat_templates` template named `chat_template`, processor) that
    `AutoModelForImageTextToText` / `AutoProcessor` load after `import stgc`."""
    from stgc.config import MoEConfig
    from stgc.data.chat_templates import apply_template
    from stgc.data.tokenizer import train_tokenizer
    from stgc.modeling import save_random_checkpoint

    texts = [
        "USER: What colour is the square? ASSISTANT: red",
        "Is there a cat in the image? Answer the question using a single word or phrase. yes no",
        "Answer with the option's letter from the given choices directly. A B C D",
        "The answer is 42. blue green yellow circle triangle left right above below unanswerable",
    ] * 20
    tokenizer = train_tokenizer(texts, vocab_size=400)
    if chat_template is not None:
        apply_template(tokenizer, chat_template)
    return save_random_checkpoint(
        path, tokenizer, backbone=backbone, size="tiny", moe=MoEConfig(**moe_kwargs), seed=seed
    )
