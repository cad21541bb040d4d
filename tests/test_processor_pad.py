"""Pad-to-square is one processor setting saved with the checkpoint: the training collator, the lmms-eval
adapter (`stgc eval`, lmms-eval, and `stgc analyze capture`, which renders its inputs with the adapter's
`_inputs`) all produce MoE-LLaVA's pixels: expand2square with the image mean, then CLIP's resize and crop."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPImageProcessorPil

from tests.test_convert_reference import expand2square


def _moellava_pixels(image: Image.Image, size: int) -> torch.Tensor:
    clip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    square = expand2square(image, tuple(int(x * 255) for x in clip.image_mean))
    return torch.as_tensor(np.asarray(clip(square)["pixel_values"][0]))


def test_training_and_evaluation_pad_identically(tmp_path):
    from evals.lmms_model import StgcMoeLlava
    from evals.testing import write_tiny_checkpoint
    from stgc.data.collate import LlavaCollator
    from stgc.modeling import build_processor

    ckpt = write_tiny_checkpoint(tmp_path / "checkpoint-0", chat_template="moellava_phi")
    saved = AutoProcessor.from_pretrained(ckpt)
    padded = build_processor(saved.tokenizer, 32, 8, pad_to_square=True)
    padded.save_pretrained(ckpt)  # what `stgc train` with data.image_aspect_ratio=pad saves
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 44, 3), dtype=np.uint8))
    expected = _moellava_pixels(image, 32)

    row = {"image": image, "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                             {"from": "gpt", "value": "red"}]}  # fmt: skip
    training = LlavaCollator(padded)([row])["pixel_values"][0]
    lm = StgcMoeLlava(pretrained=str(ckpt))
    assert lm.processor.image_processor.do_pad
    evaluation = lm._inputs([lm._prompt("What?", 1)], [[image]])["pixel_values"][0]
    torch.testing.assert_close(training, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(evaluation, expected, rtol=0, atol=1e-6)
    square = build_processor(saved.tokenizer, 32, 8)(images=[image], text=["<image>"])["pixel_values"][0]
    assert not torch.allclose(torch.as_tensor(np.asarray(square)), expected, atol=1e-3)  # crop differs
