"""The few task functions lmms-eval does not have: POPE category selection, MoE-LLaVA's answer parsing
for POPE and ScienceQA, and MoE-LLaVA's MMBench prompt. Each parser only maps the reply to the answer string
MoE-LLaVA's scripts would have scored; the scoring itself is lmms-eval's own function, called unchanged
(docs/benchmarks.md).

Referenced from the task YAMLs by module path (`!function evals.tasks.utils.<name>`).
"""

from __future__ import annotations

import re
from typing import Any

import datasets
from lmms_eval.tasks.pope.utils import pope_process_results
from lmms_eval.tasks.scienceqa.utils import sqa_process_results


def _pope_category_docs(dataset: datasets.Dataset, category: str) -> datasets.Dataset:
    if "category" not in dataset.column_names:
        raise ValueError(
            f"POPE rows have no 'category' column (columns: {dataset.column_names}); the category tasks "
            "need the default POPE config (split 'test' with a category column) or a mini suite POPE folder"
        )
    selected = dataset.filter(
        lambda category_B: [c == category for c in category_B], input_columns="category", batched=True
    )
    if len(selected) == 0:
        found = sorted(set(dataset["category"]))
        raise ValueError(f"no POPE rows of category {category!r} (categories present: {found})")
    return selected


def pope_adversarial_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    return _pope_category_docs(dataset, "adversarial")


def pope_popular_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    return _pope_category_docs(dataset, "popular")


def pope_random_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    return _pope_category_docs(dataset, "random")


def pope_moellava_parse(reply: str) -> str:
    """MoE-LLaVA's POPE parsing (moellava/eval/eval_pope.py, copied from LLaVA): keep the first sentence,
    drop commas, split on spaces; "No", "no" or "not" among the words -> "no", anything else -> "yes"."""
    text = reply
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_moellava_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """lmms-eval's pope_process_results on the leniently parsed reply, plus `pope_pred_yes_ratio`."""
    parsed = pope_moellava_parse(results[0])
    scored = pope_process_results(doc, [parsed])
    scored["pope_pred_yes_ratio"] = dict(scored["pope_accuracy"])
    return scored


def pope_aggregate_pred_yes_ratio(results: list[dict[str, Any]]) -> float:
    """Fraction of replies parsed as "yes" (MoE-LLaVA prints this as 'Yes ratio'; lmms-eval's
    pope_yes_ratio is the fraction of "yes" in the ground truth instead)."""
    if not results:
        return 0.0
    return sum(r["prediction"] == "yes" for r in results) / len(results)


# LLaVA's pattern verbatim, including the unescaped "." (any character after the letter is accepted).
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
_SQA_OPTIONS = ("A", "B", "C", "D", "E")


def sqa_moellava_parse(reply: str) -> str:
    """MoE-LLaVA's ScienceQA parsing (moellava/eval/eval_science_qa.py, from LLaVA): the reply itself when
    it is an option letter, its first character when it starts with "<letter>. ", else the letter of
    exactly one "The answer is <letter>." match; "FAILED" otherwise (scored as wrong)."""
    if reply in _SQA_OPTIONS:
        return reply
    if len(reply) >= 3 and reply[0] in _SQA_OPTIONS and reply[1:3] == ". ":
        return reply[0]
    found = _SQA_ANSWER_IS.findall(reply)
    return found[0] if len(found) == 1 else "FAILED"


def sqa_moellava_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lmms-eval's sqa_process_results on the letter MoE-LLaVA's parsing extracts from the reply."""
    return sqa_process_results(doc, [sqa_moellava_parse(results[0])])


# moellava/eval/model_vqa_mmbench.py: options A-D only, read up to the first missing one
_MMBENCH_OPTIONS = ("A", "B", "C", "D")


def _mmbench_missing(value: Any) -> bool:
    """MoE-LLaVA's ``is_none``: None, NaN, or the strings "nan" / "none" in any case."""
    if value is None or (isinstance(value, float) and value != value):
        return True
    return isinstance(value, str) and value.lower() in ("nan", "none")


def mmbench_moellava_doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    """MoE-LLaVA's MMBench question (model_vqa_mmbench.py with --single-pred-prompt): the hint (when there
    is one) and the question on their own lines, one "<letter>. <option>" line per option A-D up to the
    first missing one, then the post prompt ("\nAnswer with the option's letter from the given choices
    directly."). lmms-eval's own prompt joins hint, question and a "There are several options:" block with
    spaces instead."""
    kwargs = lmms_eval_specific_kwargs or {}
    text = doc["question"]
    if not _mmbench_missing(doc.get("hint")):
        text = f"{doc['hint']}\n{text}"
    for letter in _MMBENCH_OPTIONS:
        if _mmbench_missing(doc.get(letter)):
            break
        text += f"\n{letter}. {doc[letter]}"
    return f"{kwargs.get('pre_prompt', '')}{text}{kwargs.get('post_prompt', '')}"
