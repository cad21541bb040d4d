"""Test doubles for the evaluation adapter: a scripted lmms-eval model and a tiny suite in the real schema.

`write_tiny_suite` writes a few rows per benchmark with exactly the columns and splits of the lmms-lab
datasets (and of the mini suite, `stgc data`), so the task YAMLs and lmms-eval's scoring run unchanged; it
exists so that the adapter tests need neither the generator nor a model. `ScriptedModel` answers every
request with `reply(task, doc)`, which lets a test score known predictions through the whole pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value
from PIL import Image as PILImage

from evals.tasks import MINI_SPLITS as SPLITS


def _image(rng: np.random.Generator) -> PILImage.Image:
    return PILImage.fromarray(rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8))


def _rows(name: str, n: int, rng: np.random.Generator) -> tuple[list[dict[str, Any]], Features]:
    words = ["red", "blue", "two", "circle", "yes", "no", "3", "left"]
    img = Image()
    if name == "vqav2":
        feats = Features(
            {
                "question_id": Value("int64"),
                "question": Value("string"),
                "image": img,
                "answers": [
                    {
                        "answer": Value("string"),
                        "answer_confidence": Value("string"),
                        "answer_id": Value("int64"),
                    }
                ],
                "multiple_choice_answer": Value("string"),
                "answer_type": Value("string"),
                "question_type": Value("string"),
                "image_id": Value("int64"),
            }
        )
        rows = []
        for i in range(n):
            gold = words[i % 4]
            answers = [gold] * (3 + i % 5) + [words[(i + 1) % 4]] * (7 - i % 5)
            rows.append(
                {
                    "question_id": 1000 + i,
                    "question": f"What is thing {i}?",
                    "image": _image(rng),
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                        for j, a in enumerate(answers)
                    ],
                    "multiple_choice_answer": gold,
                    "answer_type": "other",
                    "question_type": "what",
                    "image_id": i,
                }
            )
    elif name == "gqa":
        feats = Features(
            {
                "id": Value("string"),
                "imageId": Value("string"),
                "question": Value("string"),
                "answer": Value("string"),
                "fullAnswer": Value("string"),
                "image": img,
            }
        )
        rows = [
            {
                "id": f"g{i}",
                "imageId": f"im{i}",
                "question": f"Is it left {i}?",
                "answer": words[i % 8],
                "fullAnswer": words[i % 8],
                "image": _image(rng),
            }
            for i in range(n)
        ]
    elif name == "vizwiz":
        feats = Features(
            {
                "question_id": Value("string"),
                "image": img,
                "question": Value("string"),
                "answers": Sequence(Value("string")),
                "category": Value("string"),
            }
        )
        rows = [
            {
                "question_id": f"VizWiz_val_{i:08d}",
                "image": _image(rng),
                "question": f"what is this {i}",
                "answers": ["unanswerable" if i % 3 == 0 else words[i % 4]] * 6 + [words[5]] * 4,
                "category": "other",
            }
            for i in range(n)
        ]
    elif name == "scienceqa_img":
        feats = Features(
            {
                "image": img,
                "question": Value("string"),
                "choices": Sequence(Value("string")),
                "answer": Value("int64"),
                "hint": Value("string"),
                "task": Value("string"),
                "subject": Value("string"),
            }
        )
        rows = [
            {
                "image": _image(rng),
                "question": f"Which one {i}?",
                "choices": ["north", "south", "east"][: 2 + i % 2],
                "answer": i % 2,
                "hint": "" if i % 2 else "Magnets attract.",
                "task": "closed choice",
                "subject": "natural science",
            }
            for i in range(n)
        ]
    elif name == "textvqa":
        feats = Features(
            {
                "question_id": Value("int64"),
                "question": Value("string"),
                "image": img,
                "answers": Sequence(Value("string")),
                "ocr_tokens": Sequence(Value("string")),
                "image_id": Value("string"),
            }
        )
        rows = [
            {
                "question_id": i,
                "question": f"what does sign {i} say?",
                "image": _image(rng),
                "answers": [words[i % 8]] * 10,
                "ocr_tokens": [words[i % 8], "stop"],
                "image_id": f"t{i}",
            }
            for i in range(n)
        ]
    elif name == "chartqa":
        feats = Features(
            {"type": Value("string"), "question": Value("string"), "answer": Value("string"), "image": img}
        )
        rows = [
            {
                "type": "human_test" if i % 2 else "augmented_test",
                "question": f"Value of bar {i}?",
                "answer": str(10 * (i + 1)),
                "image": _image(rng),
            }
            for i in range(n)
        ]
    elif name == "docvqa":
        feats = Features(
            {
                "questionId": Value("string"),
                "question": Value("string"),
                "image": img,
                "answers": Sequence(Value("string")),
                "docId": Value("int64"),
            }
        )
        rows = [
            {
                "questionId": str(500 + i),
                "question": f"What is the total {i}?",
                "image": _image(rng),
                "answers": [f"${i}.00", f"{i}.00"],
                "docId": i,
            }
            for i in range(n)
        ]
    elif name == "pope":
        feats = Features(
            {
                "id": Value("string"),
                "question_id": Value("string"),
                "question": Value("string"),
                "answer": Value("string"),
                "image_source": Value("string"),
                "image": img,
                "category": Value("string"),
            }
        )
        cats = ("adversarial", "popular", "random")
        rows = [
            {
                "id": str(i),
                "question_id": str(i),
                "question": f"Is there a cat {i} in the image?",
                "answer": "yes" if i % 2 == 0 else "no",
                "image_source": f"coco_{i}",
                "image": _image(rng),
                "category": cats[(i // 2) % 3],
            }
            for i in range(3 * n)
        ]
    elif name == "mme":
        feats = Features(
            {
                "question_id": Value("string"),
                "image": img,
                "question": Value("string"),
                "answer": Value("string"),
                "category": Value("string"),
            }
        )
        cats = ("existence", "count", "commonsense_reasoning")
        rows = []
        for i in range(n):
            image = _image(rng)
            for answer in ("Yes", "No"):
                rows.append(
                    {
                        "question_id": f"{cats[i % 3]}/{i:04d}.png",
                        "image": image,
                        "question": f"Is there {i} thing? Please answer yes or no.",
                        "answer": answer,
                        "category": cats[i % 3],
                    }
                )
    elif name == "mmbench":
        feats = Features(
            {
                "index": Value("int64"),
                "question": Value("string"),
                "hint": Value("string"),
                "A": Value("string"),
                "B": Value("string"),
                "C": Value("string"),
                "D": Value("string"),
                "answer": Value("string"),
                "category": Value("string"),
                "image": img,
                "source": Value("string"),
                "L2-category": Value("string"),
                "comment": Value("string"),
                "split": Value("string"),
            }
        )
        rows = []
        for q in range(n):
            options = ["red", "blue", "green", "yellow"]
            image = _image(rng)
            for r in range(4):  # circular copies: index q + r * 1e6, options rotated
                rotated = options[r:] + options[:r]
                rows.append(
                    {
                        "index": q + r * 1_000_000,
                        "question": f"Which colour {q}?",
                        "hint": "nan" if q % 2 else "Look closely.",
                        **dict(zip("ABCD", rotated)),
                        "answer": "ABCD"[rotated.index("red")],
                        "category": "attribute_recognition",
                        "image": image,
                        "source": "mini",
                        "L2-category": "attribute_reasoning",
                        "comment": "nan",
                        "split": "dev",
                    }
                )
    else:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(SPLITS)}")
    return rows, feats


def write_tiny_suite(root: str | Path, n: int = 6, seed: int = 0, names: list[str] | None = None) -> Path:
    """Write `n` rows (POPE: n per category; MME: n image pairs; MMBench: n questions x 4 rotations) of each
    benchmark under `root/<name>/` with `save_to_disk`. Returns `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for name in names or list(SPLITS):
        rows, feats = _rows(name, n, rng)
        DatasetDict({SPLITS[name]: Dataset.from_list(rows, features=feats)}).save_to_disk(str(root / name))
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
    path: str | Path, seed: int = 0, backbone: str = "llama", **moe_kwargs: Any
) -> Path:
    """A randomly initialised tiny checkpoint folder (model, tokenizer with the project's chat template,
    processor) that `AutoModelForImageTextToText` / `AutoProcessor` load after `import stgc`."""
    import torch

    from stgc.backbones import vision_config
    from stgc.config import MoEConfig
    from stgc.data.tokenizer import train_tokenizer
    from stgc.modeling import build_model, build_processor

    texts = [
        "USER: What colour is the square? ASSISTANT: red",
        "Is there a cat in the image? Answer the question using a single word or phrase. yes no",
        "Answer with the option's letter from the given choices directly. A B C D",
        "The answer is 42. blue green yellow circle triangle left right above below unanswerable",
    ] * 20
    tokenizer = train_tokenizer(texts, vocab_size=400)
    torch.manual_seed(seed)
    model = build_model(
        backbone,
        "tiny",
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        moe=MoEConfig(**moe_kwargs),
    )
    vision = vision_config("tiny")
    processor = build_processor(tokenizer, vision.image_size, vision.patch_size)
    path = Path(path)
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path
