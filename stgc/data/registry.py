"""The ten mini benchmarks: generator, the lmms-eval 0.7.3 task and split that read them, the row
schema, and the schema check other code (the evaluation adapter) reuses on any dataset folder."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, Features

from stgc.data.bench_chart import CHARTQA_FEATURES, make_chartqa
from stgc.data.bench_choice import MMBENCH_FEATURES, SCIENCEQA_FEATURES, make_mmbench, make_scienceqa_img
from stgc.data.bench_doc import DOCVQA_FEATURES, make_docvqa
from stgc.data.bench_mme import MME_CATEGORIES, MME_FEATURES, make_mme
from stgc.data.bench_scenes import (
    GQA_FEATURES,
    POPE_CATEGORIES,
    POPE_FEATURES,
    VQAV2_FEATURES,
    make_gqa,
    make_pope,
    make_vqav2,
)
from stgc.data.bench_text import TEXTVQA_FEATURES, VIZWIZ_FEATURES, make_textvqa, make_vizwiz
from stgc.data.common import Unit
from stgc.data.params import BENCHMARK_NAMES, SPLITS


@dataclass(frozen=True)
class BenchmarkSpec:
    """One mini benchmark.

    make_unit(rng, unit, image_size) -> Unit: one image and its rows; deterministic in (rng state, unit).
    lmms_task / split: the lmms-eval 0.7.3 built-in task whose code reads these rows, and its test split.
    required_columns: every field that task's doc_to_text / doc_to_visual / doc_to_target /
        process_results / aggregation reads (read from the task's YAML and utils.py).
    whole_units: True when the scoring groups rows of one image (MME pairs, MMBench circular variants),
        so a suite never cuts a group to hit an exact row count.
    """

    name: str
    make_unit: Callable[[np.random.Generator, int, int], Unit]
    lmms_task: str
    split: str
    features: Features
    required_columns: tuple[str, ...]
    whole_units: bool
    skill: str


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec(
            "vqav2", make_vqav2, "vqav2_val", "validation", VQAV2_FEATURES,
            ("image", "question", "question_id", "answers"), False,
            "coloured shapes: colour / shape / count / yes-no questions, 10 answers each",
        ),
        BenchmarkSpec(
            "gqa", make_gqa, "gqa", "testdev", GQA_FEATURES,
            ("image", "question", "answer", "id"), False,
            "spatial relations between objects",
        ),
        BenchmarkSpec(
            "vizwiz", make_vizwiz, "vizwiz_vqa_val", "val", VIZWIZ_FEATURES,
            ("image", "question", "answers", "question_id"), False,
            "single-subject photos, a third blurred / dark / off-target -> 'unanswerable'",
        ),
        BenchmarkSpec(
            "scienceqa_img", make_scienceqa_img, "scienceqa_img", "test", SCIENCEQA_FEATURES,
            ("image", "question", "hint", "choices", "answer"), False,
            "multiple choice with a context hint (magnets, materials, polygons)",
        ),
        BenchmarkSpec(
            "textvqa", make_textvqa, "textvqa_val", "validation", TEXTVQA_FEATURES,
            ("image", "question", "answers", "question_id", "ocr_tokens"), False,
            "words and numbers on signs, OCR questions, OCR tokens",
        ),
        BenchmarkSpec(
            "chartqa", make_chartqa, "chartqa", "test", CHARTQA_FEATURES,
            ("image", "question", "answer", "type"), False,
            "bar / line charts with printed values, numeric answers (relaxed accuracy)",
        ),
        BenchmarkSpec(
            "docvqa", make_docvqa, "docvqa_val", "validation", DOCVQA_FEATURES,
            ("image", "question", "questionId", "answers"), False,
            "invoices and forms with key-value lines (ANLS)",
        ),
        BenchmarkSpec(
            "pope", make_pope, "pope", "test", POPE_FEATURES,
            ("image", "question", "answer", "question_id", "category"), False,
            "object existence with random / popular / adversarial negatives",
        ),
        BenchmarkSpec(
            "mme", make_mme, "mme", "test", MME_FEATURES,
            ("image", "question", "answer", "question_id", "category"), True,
            "yes/no question pairs per image over 5 perception and 2 cognition categories",
        ),
        BenchmarkSpec(
            "mmbench", make_mmbench, "mmbench_en_dev_static", "dev", MMBENCH_FEATURES,
            ("image", "index", "question", "hint", "A", "B", "C", "D", "answer", "category",
             "L2-category", "source", "split"), True,
            "4-option multiple choice, each question in its 4 circular rotations",
        ),
    )
}  # fmt: skip


assert tuple(BENCHMARKS) == BENCHMARK_NAMES, "params.BENCHMARK_NAMES must list the registry in order"
assert {n: s.split for n, s in BENCHMARKS.items()} == SPLITS, "params.SPLITS must match the registry"


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown mini benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}")


def get_spec(name: str) -> BenchmarkSpec:
    if name not in BENCHMARKS:
        raise _unknown(name)
    return BENCHMARKS[name]


def check_schema(name: str, dataset: Dataset | DatasetDict | Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``dataset`` holds every column lmms-eval's task for ``name`` reads.

    ``dataset`` may be a ``Dataset``, a ``DatasetDict`` (then the task's split must exist) or a single row.
    The message names the missing columns, the task that needs them and how to fix it.
    """
    spec = get_spec(name)
    if isinstance(dataset, DatasetDict):
        if spec.split not in dataset:
            raise ValueError(
                f"{name}: dataset has splits {sorted(dataset)} but lmms-eval task {spec.lmms_task!r} reads "
                f"split {spec.split!r}. Fix: save the rows under split {spec.split!r} "
                f"(or regenerate: stgc data --benchmarks {name} --overwrite)."
            )
        dataset = dataset[spec.split]
    columns = dataset.column_names if isinstance(dataset, Dataset) else list(dataset)
    missing = [c for c in spec.required_columns if c not in columns]
    if missing:
        raise ValueError(
            f"{name}: dataset lacks column(s) {missing} that lmms-eval task {spec.lmms_task!r} reads "
            f"(it needs {list(spec.required_columns)}; found {sorted(columns)}). Fix: add the columns, or "
            f"regenerate the mini suite with `stgc data --benchmarks {name} --overwrite`."
        )


def check_row(name: str, row: Mapping[str, Any]) -> None:
    """Content checks beyond column presence: answer formats the task's scoring code asserts or assumes."""
    check_schema(name, row)
    problems = []
    if row.get("image") is None:
        problems.append("image is missing")
    if name in ("vqav2", "vizwiz", "textvqa") and len(row["answers"]) != 10:
        problems.append(f"expected 10 answers, got {len(row['answers'])}")
    if name == "pope" and (row["answer"] not in ("yes", "no") or row["category"] not in POPE_CATEGORIES):
        problems.append(f"answer {row['answer']!r} / category {row['category']!r} not POPE's")
    if name == "mme" and (row["answer"] not in ("Yes", "No") or row["category"] not in MME_CATEGORIES):
        problems.append(f"answer {row['answer']!r} / category {row['category']!r} not MME's")
    if name == "mmbench" and row["answer"] not in [c for c in "ABCD" if row.get(c) not in (None, "nan")]:
        problems.append(f"answer {row['answer']!r} is not one of the row's options")
    if name == "scienceqa_img" and not 0 <= row["answer"] < len(row["choices"]):
        problems.append(f"answer index {row['answer']} outside choices {row['choices']}")
    if name == "docvqa" and not row["answers"]:
        problems.append("no reference answers")
    if problems:
        raise ValueError(f"{name}: invalid row ({'; '.join(problems)})")
