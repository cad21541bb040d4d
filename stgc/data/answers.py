"""A model's greedy answers to its training rows, judged by exact match after normalisation: which
samples it answers correctly (RoMA's neighbour pool, ``stgc.objectives.roma``).

A row is a LLaVA conversation (``{"image": PIL.Image | None, "conversations": [...]}``); its question is its
first human turn (prompt and image, rendered with the tokenizer's chat template and a generation prompt, as
lmms-eval prompts the model) and its answer the first assistant turn. The reply is greedy (the model in
eval mode); a reply matches when it equals the answer after VQA answer normalisation (lmms-eval's
``EvalAIAnswerProcessor``: case, punctuation, articles, number words; what the vqav2 / vizwiz / textvqa
scorers apply; GQA's ignore-case / ignore-punctuation exact match is a subset).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from stgc.data.collate import to_messages


def normalise_answer(text: str) -> str:
    """VQA answer normalisation (lmms-eval's ``EvalAIAnswerProcessor``), lower-cased and stripped."""
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    return EvalAIAnswerProcessor()(text).strip().lower()


def first_turn(conversations: Sequence[dict[str, str]]) -> tuple[str, str, str]:
    """(instruction without ``<image>``, the first human turn as written, its answer)."""
    human = next((t for t in conversations if t["from"] == "human"), None)
    answer = next((t for t in conversations if t["from"] == "gpt"), None)
    if human is None or answer is None:
        raise ValueError(f"roma: a conversation has no human turn with an answer: {list(conversations)!r}")
    return human["value"].replace("<image>", "").strip(), human["value"], answer["value"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    out = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    if "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


@torch.no_grad()
def answers_correctly(
    model: nn.Module, rows: Sequence[dict[str, Any]], processor: Any, batch_size: int, max_new_tokens: int
) -> np.ndarray:
    """Whether greedy decoding on each row's first turn gives its first answer (``normalise_answer``)."""
    tok = processor.tokenizer
    param = next(model.parameters())
    side, tok.padding_side = tok.padding_side, "left"  # generation continues every row at one position
    correct = []
    try:
        with eval_mode(model):
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                prompts, golds, images = [], [], []
                for row in chunk:
                    _, human, answer = first_turn(row["conversations"])
                    messages = to_messages([{"from": "human", "value": human}])
                    render = tok.apply_chat_template
                    prompts.append(render(messages, tokenize=False, add_generation_prompt=True))
                    golds.append(answer)
                    if row.get("image") is not None:  # (a text-only row has no <image> either)
                        images.append(row["image"].convert("RGB"))
                enc = processor(text=prompts, images=images or None, padding=True, return_tensors="pt")
                enc = to_device(dict(enc), param.device, param.dtype)
                # exact match after normalisation cannot hold for a reply much longer than the answer
                longest = max(len(tok(g, add_special_tokens=False)["input_ids"]) for g in golds)
                out_BS = model.generate(
                    **enc,
                    max_new_tokens=min(max_new_tokens, longest + 4),
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
                replies = tok.batch_decode(out_BS[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                correct += [normalise_answer(r) == normalise_answer(g) for r, g in zip(replies, golds)]
    finally:
        tok.padding_side = side
    return np.asarray(correct, dtype=bool)
