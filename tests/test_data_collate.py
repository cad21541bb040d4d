"""The generated tokenizer (offline AutoTokenizer, special tokens, LLaVA-v1 chat template) and the training
collator (image-token expansion, label masking, right padding, truncation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

from stgc.data.collate import IGNORE_INDEX, LlavaCollator, answer_spans, to_messages
from stgc.data.suite import generate_suite, load_train

PATCHES = 16  # (32 / 8)^2 patches + 1 CLS - 1 ("default" strategy drops CLS)


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("collate") / "mini"
    generate_suite(
        out, docs=2, train_size=40, image_size=64, seed=1, benchmarks=["vqav2", "mme", "mmbench", "gqa"]
    )
    return out


@pytest.fixture(scope="module")
def tokenizer(suite: Path):
    return AutoTokenizer.from_pretrained(str(suite / "tokenizer"), local_files_only=True)


@pytest.fixture(scope="module")
def processor(tokenizer) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def test_tokenizer_special_tokens_and_template(tokenizer) -> None:
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    assert tokenizer.image_token == "<image>"
    assert len(tokenizer("<image>", add_special_tokens=False).input_ids) == 1
    assert tokenizer("a").input_ids[0] == tokenizer.bos_token_id  # BOS from the tokenizer, not the template
    assert len(tokenizer) <= 3000
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And the shape?"},
        {"role": "assistant", "content": "circle"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert (
        text
        == "USER: <image>\nWhat color is it? ASSISTANT: red</s>USER: And the shape? ASSISTANT: circle</s>"
    )
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat color is it? ASSISTANT:"
    # the generation prompt tokenizes to a prefix of the full conversation (training == generation)
    full = tokenizer(text).input_ids
    head = tokenizer(prompt).input_ids
    assert full[: len(head)] == head


def _rows(suite: Path, n: int, multi_turn: bool = True) -> list[dict]:
    train = load_train(suite)
    rows = [train[i] for i in range(len(train))]
    if multi_turn:
        rows.sort(key=lambda r: -len(r["conversations"]))  # the multi-turn ones (MME pairs) first
    return rows[:n]


def test_labels_cover_exactly_the_answers(suite: Path, processor: LlavaProcessor) -> None:
    rows = _rows(suite, 4)
    assert len(rows[0]["conversations"]) >= 4  # at least one two-turn conversation is tested
    batch = LlavaCollator(processor, max_length=512)(rows)
    B, T = batch["input_ids"].shape
    assert B == 4 and batch["labels"].shape == (B, T) and batch["attention_mask"].shape == (B, T)
    assert batch["pixel_values"].shape == (B, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    tok = processor.tokenizer
    for b, row in enumerate(rows):
        ids, labels, mask = batch["input_ids"][b], batch["labels"][b], batch["attention_mask"][b]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert (ids[n:] == tok.pad_token_id).all() and (labels[n:] == IGNORE_INDEX).all()
        assert ids[0] == tok.bos_token_id
        assert int((ids == processor.image_token_id).sum()) == PATCHES
        answers = [t["value"] for t in row["conversations"] if t["from"] == "gpt"]
        kept = labels[labels != IGNORE_INDEX]
        assert tok.decode(kept) == "".join(f" {a}</s>" for a in answers)
        assert (kept == ids[labels != IGNORE_INDEX]).all()
        assert not (labels == processor.image_token_id).any()  # no image or prompt token is a target


def test_truncation_cuts_text_but_never_image_tokens(suite: Path, processor: LlavaProcessor) -> None:
    rows = _rows(suite, 1)
    full = LlavaCollator(processor, max_length=4096)(rows)
    length = int(full["attention_mask"].sum())
    image_end = int((full["input_ids"][0] == processor.image_token_id).nonzero().max())
    cut = LlavaCollator(processor, max_length=length - 3)(rows)
    assert cut["input_ids"].shape[1] == length - 3
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, : length - 3])
    assert torch.equal(cut["labels"][0], full["labels"][0, : length - 3])
    with pytest.raises(ValueError, match="image tokens"):
        LlavaCollator(processor, max_length=image_end)(rows)
    with pytest.raises(ValueError, match="max_length"):
        LlavaCollator(processor, max_length=0)


def test_bad_rows_are_refused(processor: LlavaProcessor) -> None:
    collate = LlavaCollator(processor)
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    with pytest.raises(ValueError, match=r"'x' has 0 image\(s\) and must hold 0 '<image>'.*found 1"):
        collate([{"id": "x", "image": None, "conversations": conv}])
    no_placeholder = [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "red"}]
    with pytest.raises(ValueError, match=r"has 1 image\(s\) and must hold 1"):
        collate([{"id": "y", "image": Image.new("RGB", (40, 40)), "conversations": no_placeholder}])
    with pytest.raises(ValueError, match="unknown conversation role"):
        to_messages([{"from": "robot", "value": "hi"}])


def test_answer_spans_follow_the_template(tokenizer) -> None:
    messages = to_messages([{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "yes"}])
    text, spans = answer_spans(tokenizer, messages)
    assert [text[a:b] for a, b in spans] == [" yes</s>"]
