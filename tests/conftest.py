"""Shared fixtures: a tiny word-level tokenizer with an ``<image>`` token (built in-test with the
``tokenizers`` library: nothing is downloaded) and tiny models for every text backbone."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the project's Triton kernels run on CPU tensors in Triton's interpreter (tests only:
    # ``stgc.moe.fused.passes.TRITON_ON_CPU``); it must be on before the kernels are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = (
    "the a is of and to in what color shape how many red green blue yellow square circle triangle left "
    "right above below yes no one two three four five answer question image user assistant . ? , :"
).split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]


def make_tokenizer(with_image: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: ids 0-4 are <pad> <unk> <s> </s> <image>, then ``WORDS``."""
    specials = SPECIALS if with_image else SPECIALS[:-1]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if with_image:
        fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def tiny_model(backbone: str = "llama", seed: int = 0, **moe_kwargs):
    """A tiny MoE-LLaVA model (fp32, eval mode) for ``backbone``, with a vocabulary of the test tokenizer."""
    from stgc.config import MoEConfig
    from stgc.modeling import build_model

    tok = make_tokenizer()
    torch.manual_seed(seed)
    model = build_model(
        backbone,
        "tiny",
        vocab_size=len(tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
        moe=MoEConfig(**moe_kwargs),
    )
    return model.eval()


def tiny_dense_llava(backbone: str = "llama", seed: int = 0):
    """A tiny dense transformers LLaVA (the parent of sparse upcycling)."""
    from transformers import LlavaForConditionalGeneration

    from stgc.modeling import build_llava_config

    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = build_llava_config(
        backbone,
        "tiny",
        vocab_size=len(tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
    )
    return LlavaForConditionalGeneration(cfg).eval()


def image_batch(model, batch: int = 2, text_len: int = 6, seed: int = 0, pad_right: int = 0):
    """input_ids [<image> x N, words...] (+ right padding), attention_mask and pixel_values for ``model``."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    words_BS = torch.randint(len(SPECIALS), len(SPECIALS) + len(WORDS), (batch, text_len), generator=g)
    img_BS = torch.full((batch, n_img), cfg.image_token_id)
    input_ids = torch.cat([img_BS, words_BS], dim=1)
    attention_mask = torch.ones_like(input_ids)
    if pad_right:
        pad_id = cfg.text_config.pad_token_id
        input_ids = torch.cat([input_ids, torch.full((batch, pad_right), pad_id)], dim=1)
        attention_mask = torch.cat([attention_mask, torch.zeros(batch, pad_right, dtype=torch.long)], dim=1)
    size = cfg.vision_config.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=g)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
