"""The prompt each lmms-eval 0.7.3 task builds from a row with its default ``lmms_eval_specific_kwargs``,
and the target answer, so training conversations use exactly the evaluation prompt styles.

These mirror the tasks' ``doc_to_text`` (they only format strings; no metric is re-implemented), so
``stgc data`` needs no lmms-eval import; tests/test_data_prompts.py holds them equal to lmms-eval's own
functions on generated rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stgc.data.common import MME_SUFFIX, OPTION_LETTER, SHORT_ANSWER, SINGLE_WORD, VIZWIZ_POST

MMBENCH_SYS_PROMPT = "There are several options:"  # lmms-eval tasks/mmbench/mmbench.yaml metadata


def _is_nan(x: Any) -> bool:
    return x is None or x == "nan" or (isinstance(x, float) and x != x)


def doc_to_text(name: str, row: Mapping[str, Any], ocr: bool = False) -> str:
    """The question text lmms-eval shows the model for ``row`` of benchmark ``name`` (default kwargs;
    ``ocr=True`` is TextVQA's LLaVA protocol with the OCR tokens appended)."""
    q = row["question"]
    if name in ("vqav2", "gqa", "docvqa"):
        return f"{q}{SHORT_ANSWER}"
    if name == "pope":
        return f"{q.strip()}{SHORT_ANSWER}"
    if name == "chartqa":
        return f"{q}{SINGLE_WORD}"
    if name == "vizwiz":
        return f"{q.capitalize()}{VIZWIZ_POST}"
    if name == "textvqa":
        ocr_ref = f"\nReference OCR token: {', '.join(row['ocr_tokens'])}" if ocr else ""
        return f"{q.capitalize()}{ocr_ref}{SHORT_ANSWER}"
    if name == "mme":
        return f"{q.strip().replace(MME_SUFFIX, '')}{SHORT_ANSWER}"
    if name == "scienceqa_img":
        options = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(row["choices"]))
        context = f"Context: {row['hint']}\n" if row["hint"] else ""
        return f"{context}{q}\n{options}{OPTION_LETTER}"
    if name == "mmbench":
        present = {c: row[c] for c in "ABCDE" if c in row and row[c] and not _is_nan(row[c])}
        options = MMBENCH_SYS_PROMPT + "\n" + "".join(f"{k}. {v}\n" for k, v in sorted(present.items()))
        options = options.rstrip("\n")
        hint = row["hint"]
        query = f"{hint} {q} {options}" if not _is_nan(hint) else f"{q} {options}"
        return f"{query}\n{OPTION_LETTER}"
    raise ValueError(f"no prompt format for benchmark {name!r}")


def doc_to_target(name: str, row: Mapping[str, Any]) -> str:
    """The answer a perfect model gives (what training teaches; the scoring check's gold prediction)."""
    if name == "vqav2":
        return row["multiple_choice_answer"]
    if name in ("vizwiz", "textvqa"):
        answers = list(row["answers"])
        return max(set(answers), key=lambda a: (answers.count(a), a))
    if name == "docvqa":
        return row["answers"][0]
    if name == "scienceqa_img":
        return chr(ord("A") + int(row["answer"]))
    return row["answer"]


def answer_format(name: str, answer: str) -> str:
    """One of: option_letter, yes_no, number, single_word (a word or short phrase), free_text."""
    if name in ("scienceqa_img", "mmbench"):
        return "option_letter"
    if answer.lower() in ("yes", "no"):
        return "yes_no"
    try:
        float(answer.replace("$", "").replace(",", ""))
        return "number"
    except ValueError:
        return "single_word"
