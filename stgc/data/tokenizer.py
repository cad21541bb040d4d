"""A small byte-level BPE tokenizer trained on the generated text, saved as a transformers
``PreTrainedTokenizerFast`` with LLaVA-v1 conversation formatting.

Conventions (those of llava-hf checkpoints, so the same model code serves real and tiny models):
- ``<s>`` is added at the start of every encoded text by the tokenizer's post-processor, not by the chat
  template (``LlavaProcessor`` tokenizes the rendered prompt with special tokens on, exactly once).
- ``<image>`` is a special token; ``LlavaProcessor`` expands it into one token per visual patch.
- A turn renders as ``USER: <image>\\n{question} ASSISTANT: {answer}</s>``; the generation prompt ends with
  ``ASSISTANT:`` and the model continues with `` {answer}</s>``. Byte-level pre-tokenisation splits at the
  colon, so a prompt's tokens are always a prefix of the full conversation's tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK, IMAGE = "<s>", "</s>", "<pad>", "<unk>", "<image>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IMAGE]  # ids 0..4 in this order

# Messages: {"role": "system" | "user" | "assistant",
#            "content": str | [{"type": "image"}, {"type": "text", "text": ...}]}
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set ns = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = ns.text -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ text }}{{ ' ' }}"
    "{%- elif message['role'] == 'user' -%}USER: {{ text }}{{ ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}ASSISTANT: {{ text }}{{ eos_token }}"
    "{%- else -%}{{ raise_exception('unknown role ' + message['role']) }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 3000) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts`` and wrap it with the special tokens and chat template above."""
    if not 300 <= vocab_size <= 100_000:
        raise ValueError(f"vocab_size={vocab_size} is outside [300, 100000] (256 bytes + specials + merges)")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="right",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | Path) -> None:
    tokenizer.save_pretrained(str(path))
