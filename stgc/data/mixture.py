"""The training mixture: LLaVA-style conversations over fresh images of every mini benchmark.

Like LLaVA-665K it mixes answer formats under their own prompt styles (the lmms-eval post-prompts):
single word / phrase, option letter, number, yes/no, and free text (captions and GQA's full-sentence
answers without any post-prompt). Questions about one image that share an answer format form one
multi-turn conversation; a conversation never mixes formats, so ``answer_format`` is exact per row.
Images come from the training random stream and any image whose pixels also appear in an evaluation set
is skipped, so training and evaluation share no image and no (question, image) pair.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
from datasets import Dataset, Features, Image, List, Value

from stgc.data.bench_scenes import pope_question
from stgc.data.common import Unit
from stgc.data.generate import iter_units
from stgc.data.prompts import answer_format, doc_to_target, doc_to_text
from stgc.data.render import SHAPES

TRAIN_FEATURES = Features(
    {
        "id": Value("string"),
        "image": Image(),
        "conversations": List({"from": Value("string"), "value": Value("string")}),
        "benchmark": Value("string"),
        "answer_format": Value("string"),
    }
)
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "What is shown in this image?",
    "Give a short description of the picture.",
)
CAPTION_SHARE = 0.15  # of units that have a caption, one extra free-text conversation
FULL_ANSWER_SHARE = 0.3  # of GQA units answered in full sentences with no post-prompt
POPE_TRAIN_QUESTIONS = 6  # existence questions per POPE training image (half about present shapes)


def _turns(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    turns = []
    for k, (question, answer) in enumerate(pairs):
        turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def _pope_extra_rows(unit: Unit, rng: np.random.Generator) -> list[dict[str, Any]]:
    """More existence questions about a POPE training image (its present shapes and absent ones, equally
    many), so that one image teaches up to ``POPE_TRAIN_QUESTIONS`` answers rather than the 2 its
    evaluation unit asks."""
    present = list(unit.extra.get("present", []))
    asked = {r["question"] for r in unit.rows}
    absent = [s for s in SHAPES if s not in present]
    half = POPE_TRAIN_QUESTIONS // 2
    picks = [(str(s), "yes") for s in rng.permutation(present)[:half]]
    picks += [(str(s), "no") for s in rng.permutation(absent)[:half]]
    extra = []
    for k in rng.permutation(len(picks)):
        shape, answer = picks[int(k)]
        question = pope_question(shape)
        if question not in asked:
            extra.append({**unit.rows[0], "question": question, "answer": answer})
    return extra[: POPE_TRAIN_QUESTIONS - len(unit.rows)]


def unit_conversations(name: str, unit: Unit, rng: np.random.Generator) -> list[tuple[str, list[dict]]]:
    """(answer_format, conversation) pairs for one generated unit."""
    rows = unit.rows
    if name == "mmbench":  # the 4 rows are rotations of one question: train on one of them
        rows = [rows[int(rng.integers(len(rows)))]]
    out: list[tuple[str, list[dict]]] = []
    if name == "pope":
        rows = rows + _pope_extra_rows(unit, rng)
    if name == "gqa" and rng.random() < FULL_ANSWER_SHARE:
        out.append(("free_text", _turns([(r["question"], r["fullAnswer"]) for r in rows])))
    else:
        by_format: dict[str, list[tuple[str, str]]] = {}
        for r in rows:
            target = doc_to_target(name, r)
            ocr = name == "textvqa" and rng.random() < 0.5  # both TextVQA protocols (with / without OCR)
            by_format.setdefault(answer_format(name, target), []).append(
                (doc_to_text(name, r, ocr=ocr), target)
            )
        out.extend((fmt, _turns(pairs)) for fmt, pairs in by_format.items())
    if unit.caption and rng.random() < CAPTION_SHARE:
        prompt = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
        out.append(("free_text", _turns([(prompt, unit.caption)])))
    return out


def build_mixture(
    benchmarks: list[str], size: int, seed: int, image_size: int, exclude: set[str]
) -> list[dict[str, Any]]:
    """``size`` conversations, an equal share per benchmark, shuffled with ``seed``."""
    shares = [
        size // len(benchmarks) + (1 if i < size % len(benchmarks) else 0) for i in range(len(benchmarks))
    ]
    rows: list[dict[str, Any]] = []
    for name, share in zip(benchmarks, shares):
        got: list[dict[str, Any]] = []
        if share == 0:
            continue
        for unit_idx, unit, _ in iter_units(name, seed, image_size, "train", exclude=exclude):
            rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 2, unit_idx])
            for k, (fmt, conv) in enumerate(unit_conversations(name, unit, rng)):
                got.append(
                    {
                        "id": f"{name}-{unit_idx:06d}-{k}",
                        "image": unit.image,
                        "conversations": conv,
                        "benchmark": name,
                        "answer_format": fmt,
                    }
                )
            if len(got) >= share:
                break
        rows.extend(got[:share])
    order = np.random.default_rng([seed, 99]).permutation(len(rows))
    return [rows[i] for i in order]


def mixture_dataset(rows: list[dict[str, Any]]) -> Dataset:
    return Dataset.from_list(rows, features=TRAIN_FEATURES)


def conversation_text(conversations: list[dict[str, str]]) -> str:
    """Plain text of a conversation (tokenizer training corpus)."""
    return "\n".join(turn["value"] for turn in conversations)
