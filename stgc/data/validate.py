"""Row values checked on load: training conversations and evaluation rows (types, non-empty where needed).

Column checks alone let values through that fail much later or not at all: a ``None`` answer in a training
conversation renders as an empty target (the row then trains on nothing), a ``None`` answer in an
evaluation row fails inside lmms-eval's retried loader (a tenacity RetryError), an empty question is scored
as if it were asked. Each check raises ``ValueError`` naming the dataset, the row and the field.

The checks run on Arrow batches (pyarrow compute, no Python object per row): LLaVA-mix-665K's conversation
column is checked in seconds, and an image column is never decoded (only its nulls are counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROLES = ("human", "gpt", "system")  # stgc.data.collate.ROLES (not imported: it loads torch)
BATCH_ROWS = 65536
# evaluation: fields that must be a non-empty string; fields that must be present (not None)
EVAL_TEXT_FIELDS = ("question",)
EVAL_VALUE_FIELDS = ("answer", "answers", "image")


def _row_label(table: pa.Table, row: int, start: int) -> str:
    for key in ("id", "question_id", "questionId", "index"):
        if key in table.column_names:
            value = table.column(key)[row].as_py()
            if value is not None:
                return f"row {start + row} ({key} {value!r})"
    return f"row {start + row}"


def _batches(dataset: Any, columns: Sequence[str]):
    """(start row, pa.Table) batches of ``columns`` of a datasets.Dataset (its row order and selection)."""
    subset = dataset.select_columns(list(columns)).with_format("arrow")
    start = 0
    for table in subset.iter(batch_size=BATCH_ROWS):
        yield start, table
        start += table.num_rows


def _first(mask: pa.Array | np.ndarray) -> int | None:
    values = mask.to_numpy(zero_copy_only=False) if isinstance(mask, pa.Array | pa.ChunkedArray) else mask
    hits = np.flatnonzero(np.asarray(values, dtype=bool))
    return int(hits[0]) if len(hits) else None


def _blank(strings: pa.Array) -> pa.Array:
    """True where a string is null or only whitespace."""
    return pc.fill_null(pc.equal(pc.utf8_trim_whitespace(strings), ""), True)


def check_training_rows(dataset: Any, name: str) -> None:
    """Every row of a training set holds a conversation the collator can learn from: ``conversations`` is a
    non-empty list of turns, each turn has ``from`` in human / gpt / system and a non-empty ``value``, and
    at least one turn is the assistant's (gpt). ``name`` names the dataset in the message."""
    if "conversations" not in dataset.column_names:
        raise ValueError(
            f"{name} has no 'conversations' column (its columns: {dataset.column_names}); training rows need "
            "LLaVA conversations [{'from': 'human'|'gpt', 'value': ...}] (`stgc data` writes them)."
        )
    ids = [c for c in ("id",) if c in dataset.column_names]
    for start, table in _batches(dataset, ["conversations", *ids]):
        problem = _conversation_problem(table.column("conversations").combine_chunks())
        if problem is not None:
            row, what = problem
            raise ValueError(
                f"{name} {_row_label(table, row, start)}: {what}; every turn needs a 'from' (human / gpt) "
                "and a non-empty 'value', and a conversation at least one gpt answer. Fix the row or drop it."
            )


def _conversation_problem(conv: pa.Array) -> tuple[int, str] | None:
    """(row, what is wrong) of the first bad conversation of a batch, or None."""
    if not (pa.types.is_list(conv.type) or pa.types.is_large_list(conv.type)):
        return 0, f"conversations is of type {conv.type}, not a list of turns"
    turn_type = conv.type.value_type
    if not pa.types.is_struct(turn_type) or {"from", "value"} - {f.name for f in turn_type}:
        return 0, f"conversations turns are {turn_type}, not {{'from', 'value'}} records"
    row = _first(pc.fill_null(pc.equal(pc.list_value_length(conv), 0), True))
    if row is not None:
        return row, "conversations is empty or None"
    turns = conv.flatten()
    parents = pc.list_parent_indices(conv).to_numpy()
    role, value = turns.field("from"), turns.field("value")
    valid_role = pc.fill_null(pc.is_in(role, value_set=pa.array(ROLES)), False)
    checks = (
        (turns.is_null(), lambda k, i: f"conversations[{k}] is None"),
        (pc.invert(valid_role), lambda k, i: f"conversations[{k}].from is {role[i].as_py()!r}, not a role"),
        (value.is_null(), lambda k, i: f"conversations[{k}].value ({role[i].as_py()} turn) is None"),
        (_blank(value), lambda k, i: f"conversations[{k}].value ({role[i].as_py()} turn) is empty"),
    )
    for mask, say in checks:
        i = _first(mask)
        if i is not None:
            row = int(parents[i])
            k = i - int(np.searchsorted(parents, row))
            return row, say(k, i)
    gpt = pc.fill_null(pc.equal(role, "gpt"), False).to_numpy(zero_copy_only=False)
    answers = np.bincount(parents[gpt], minlength=len(conv))
    row = _first(answers == 0)
    if row is not None:
        return row, "the conversation has no gpt (answer) turn"
    return None


def check_eval_rows(benchmark: str, dataset: Any, name: str) -> None:
    """Every row of an evaluation split has a non-empty ``question`` and an answer (``answer`` /
    ``answers``, a non-empty list without None items) and an image, where the benchmark has those
    columns. ``name`` names the dataset (its folder) in the message."""
    columns = dataset.column_names
    text = [c for c in EVAL_TEXT_FIELDS if c in columns]
    values = [c for c in EVAL_VALUE_FIELDS if c in columns]
    ids = [c for c in ("id", "question_id", "questionId", "index") if c in columns][:1]
    for start, table in _batches(dataset, list(dict.fromkeys([*text, *values, *ids]))):
        for field in text:
            row = _first(_blank(table.column(field).combine_chunks()))
            if row is not None:
                value = table.column(field)[row].as_py()
                raise ValueError(
                    f"{name} ({benchmark}) {_row_label(table, row, start)}: {field} is "
                    f"{'None' if value is None else 'empty'}; a {benchmark} row needs a non-empty {field} "
                    "(lmms-eval would score it as asked). Fix the row or drop it."
                )
        for field in values:
            column = table.column(field).combine_chunks()
            what, row = "None", _first(column.is_null())
            if row is None and (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
                what, row = "an empty list", _first(pc.equal(pc.list_value_length(column), 0))
                if row is None:
                    inner = column.flatten()
                    if pa.types.is_struct(inner.type) and "answer" in {f.name for f in inner.type}:
                        inner = inner.field("answer")
                    i = _first(inner.is_null())
                    if i is not None:
                        what, row = "a list holding None", int(pc.list_parent_indices(column)[i].as_py())
            elif row is None and pa.types.is_string(column.type):
                what, row = "empty", _first(_blank(column))
            if row is not None:
                raise ValueError(
                    f"{name} ({benchmark}) {_row_label(table, row, start)}: {field} is {what}; lmms-eval's "
                    f"{benchmark} task reads it for every row (a None fails inside its loader). Fix the row "
                    "or drop it."
                )


__all__ = ["check_eval_rows", "check_training_rows"]
