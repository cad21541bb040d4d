"""Training collation: LLaVA conversations -> input_ids, attention_mask, pixel_values, labels.

Shapes (legend: docs/architecture.md, Conventions): B batch, T tokens (after image expansion and padding),
C channels, H/W pixels.

Labels are -100 everywhere except the assistant answers and their closing ``</s>`` (LLaVA's masking: the
model learns to answer, not to ask). A row without image (LLaVA-665K's text-only conversations) has no
``<image>`` placeholder; ``pixel_values`` holds the images of the other rows, in row order, and is left out
of a batch without images. The answer spans are found on the chat template's own rendering:
rendering the conversation up to each assistant turn with ``add_generation_prompt=True`` gives where the
answer starts, rendering it through that turn gives where it ends; token offsets from the processor map
those character spans to tokens, so no template string is duplicated here. Padding is on the right.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def to_messages(conversations: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """LLaVA ``[{"from": "human"|"gpt", "value": ...}]`` -> chat ``[{"role": ..., "content": ...}]``."""
    out = []
    for turn in conversations:
        if turn["from"] not in ROLES:
            raise ValueError(f"unknown conversation role {turn['from']!r}; expected one of {sorted(ROLES)}")
        out.append({"role": ROLES[turn["from"]], "content": turn["value"]})
    return out


def answer_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant answer (with its eos)."""
    render = tokenizer.apply_chat_template
    text = render(messages, tokenize=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:k], tokenize=False, add_generation_prompt=True)
        through = render(messages[: k + 1], tokenize=False)
        # the template must render a prefix of the conversation as a prefix of its text (LLaVA-v1 does)
        assert through.startswith(prompt) and text.startswith(through), "chat template is not prefix-stable"
        spans.append((len(prompt), len(through)))
    return text, spans


def _shift_for_expansion(
    text: str, spans: list[tuple[int, int]], image_token: str, per_image: int
) -> list[tuple[int, int]]:
    """Move character spans of ``text`` to the processor's text, where each image token became
    ``per_image`` copies of itself."""
    starts = [i for i in range(len(text)) if text.startswith(image_token, i)]
    extra = (per_image - 1) * len(image_token)

    def move(pos: int) -> int:
        return pos + extra * sum(1 for s in starts if s < pos)

    return [(move(a), move(b)) for a, b in spans]


@dataclass
class LlavaCollator:
    """Collate rows of the training mixture (``image``, ``conversations``) for a LLaVA model.

    processor: a transformers ``LlavaProcessor`` (image processor + this project's tokenizer).
    max_length: longest sequence kept; longer ones are cut on the right. Cutting into the image tokens
        raises ValueError (the model would see a partial image), naming the length needed.
    clusters: a fitted ``stgc.clusters.InstructionClusters`` for routers that read each sample's
        instruction cluster (MoCLE-style); the batch then has ``cluster_ids`` (B,) too.
    """

    processor: Any
    max_length: int = 2048
    clusters: Any = None

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"max_length={self.max_length} must be >= 1")
        tok = self.processor.tokenizer
        if tok.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. '<pad>')")
        self.image_token = self.processor.image_token
        self.image_token_id = self.processor.image_token_id

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        tok = self.processor.tokenizer
        texts, spans, images = [], [], []
        for row in rows:
            text, row_spans = answer_spans(tok, to_messages(row["conversations"]))
            expected = 0 if row.get("image") is None else 1
            if text.count(self.image_token) != expected:
                raise ValueError(
                    f"row {row.get('id', '?')!r} has {expected} image(s) and must hold {expected} "
                    f"{self.image_token!r} in its conversation (found {text.count(self.image_token)})"
                )
            texts.append(text)
            spans.append(row_spans)
            if expected:
                images.append(row["image"].convert("RGB"))
        enc = self.processor(text=texts, images=images or None, return_offsets_mapping=True)

        ids_list, labels_list = [], []
        for b, (text, row_spans) in enumerate(zip(texts, spans)):
            ids = list(enc["input_ids"][b])
            per_image = ids.count(self.image_token_id)
            moved = _shift_for_expansion(text, row_spans, self.image_token, per_image)
            labels = [IGNORE_INDEX] * len(ids)
            for i, (start, end) in enumerate(enc["offset_mapping"][b]):
                if end > start and any(start < b_end and end > b_start for b_start, b_end in moved):
                    labels[i] = ids[i]
            if len(ids) > self.max_length:
                last_image = max((i for i, t in enumerate(ids) if t == self.image_token_id), default=-1)
                if last_image >= self.max_length:
                    raise ValueError(
                        f"max_length={self.max_length} would cut the image tokens of row {b} (they end at "
                        f"position {last_image}); use max_length >= {len(ids)} for this row"
                    )
                ids, labels = ids[: self.max_length], labels[: self.max_length]
            ids_list.append(ids)
            labels_list.append(labels)

        T = max(len(x) for x in ids_list)
        pad = tok.pad_token_id
        input_ids_BT = torch.full((len(rows), T), pad, dtype=torch.long)
        attention_mask_BT = torch.zeros((len(rows), T), dtype=torch.long)
        labels_BT = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for b, (ids, labels) in enumerate(zip(ids_list, labels_list)):
            input_ids_BT[b, : len(ids)] = torch.tensor(ids)
            attention_mask_BT[b, : len(ids)] = 1
            labels_BT[b, : len(labels)] = torch.tensor(labels)
        batch = {"input_ids": input_ids_BT, "attention_mask": attention_mask_BT, "labels": labels_BT}
        if images:
            batch["pixel_values"] = torch.from_numpy(np.stack([np.asarray(p) for p in enc["pixel_values"]]))
        if self.clusters is not None:
            from stgc.clusters import first_instruction

            ids = self.clusters.predict([first_instruction(row["conversations"]) for row in rows])
            batch["cluster_ids"] = torch.from_numpy(ids)
        return batch
