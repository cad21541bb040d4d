"""MoE-LLaVA's conversation templates as Jinja chat templates (tokenizer ``chat_template``).

MoE-LLaVA formats every prompt with ``moellava/conversation.py``: the ``stablelm``, ``phi`` and ``qwen``
modes (``qwen`` maps to the same ``conv_phi`` object) and Vicuna's ``v1`` (its LLaMA models) share the
system prompt, the roles ``USER`` / ``ASSISTANT`` and separator style ``TWO``:

    {system}{sep}USER: {question}{sep}ASSISTANT: {answer}{sep2}USER: ...{sep}ASSISTANT:

with sep " " after a user turn and sep2 after an assistant turn; generation stops at sep2. The image
placeholder leads the first user turn ("<image>\\n" + question), as LLaVA's preprocessing puts it.

sep2 is the backbone tokenizer's end-of-text token ("<|endoftext|>" for StableLM-2, Phi-2 and Qwen-1; "</s>"
for Vicuna/LLaMA), so the Jinja template renders it as ``eos_token``: with the backbone's tokenizer the text
is MoE-LLaVA's character for character, and generation (which stops at EOS) stops where MoE-LLaVA's
``KeywordsStoppingCriteria`` stops. ``stgc convert`` checks that the tokenizer's EOS is the template's sep2
(``check_eos``); a new run may select a template for any tokenizer (``data.chat_template``), whose EOS then
closes each answer.

Messages: ``{"role": "system" | "user" | "assistant", "content": str | [{"type": "image"},
{"type": "text", "text": ...}]}``. A leading system message replaces the template's system prompt; the image
parts of a message are rendered first, one "<image>\\n" each (the adapter sends the question text after
them).
"""

from __future__ import annotations

import dataclasses

IMAGE_PLACEHOLDER = "<image>"
# moellava/conversation.py, conv_phi / conv_stablelm / conv_vicuna_v1 `system` (one string in two parts)
MOELLAVA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclasses.dataclass(frozen=True)
class ConversationTemplate:
    """One MoE-LLaVA conversation mode (separator style TWO).

    source: the ``conv_templates`` key in MoE-LLaVA's conversation.py; sep2 is documentation and the value
    ``check_eos`` expects of a tokenizer (the Jinja text uses the tokenizer's ``eos_token``).
    """

    name: str
    source: str
    system: str = MOELLAVA_SYSTEM
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "<|endoftext|>"

    def jinja(self) -> str:
        """The Jinja chat template (see the module docstring)."""
        user, assistant = (_jinja_str(r) for r in self.roles)
        sep = _jinja_str(self.sep)
        return (
            "{%- set ns = namespace(system=" + _jinja_str(self.system) + ") -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set ns.system = messages[0]['content'] -%}{%- endif -%}"
            "{{ ns.system }}{{ " + sep + " }}"
            "{%- for message in messages -%}"
            "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
            "{%- else -%}{%- set parts = namespace(images='', text='') -%}"
            "{%- for part in message['content'] -%}"
            "{%- if part['type'] == 'image' -%}{%- set parts.images = parts.images + '<image>\\n' -%}"
            "{%- elif part['type'] == 'text' -%}{%- set parts.text = parts.text + part['text'] -%}"
            "{%- endif -%}{%- endfor -%}{%- set text = parts.images + parts.text -%}{%- endif -%}"
            "{%- if message['role'] == 'user' -%}{{ " + user + " }}: {{ text }}{{ " + sep + " }}"
            "{%- elif message['role'] == 'assistant' -%}{{ " + assistant + " }}: {{ text }}{{ eos_token }}"
            "{%- elif message['role'] != 'system' or not loop.first -%}"
            "{{ raise_exception('unknown or misplaced role ' + message['role']) }}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ " + assistant + " }}:{%- endif -%}"
        )


def _jinja_str(text: str) -> str:
    """A Python string as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


TEMPLATES: dict[str, ConversationTemplate] = {
    t.name: t
    for t in (
        ConversationTemplate("moellava_stablelm", source="stablelm"),
        ConversationTemplate("moellava_phi", source="phi"),
        ConversationTemplate("moellava_qwen", source="qwen"),  # conv_templates["qwen"] is conv_phi
        ConversationTemplate("moellava_vicuna_v1", source="v1", sep2="</s>"),
    )
}
# MoE-LLaVA checkpoint model_type -> the template its evaluation scripts use (--conv-mode per backbone)
FOR_MODEL_TYPE: dict[str, str] = {
    "moe_llava_stablelm": "moellava_stablelm",
    "moe_llava_phi": "moellava_phi",
    "moe_llava_qwen": "moellava_qwen",
    "moe_llava_qwen1.5": "moellava_qwen",
    "moe_llava_llama": "moellava_vicuna_v1",
}


def get_template(name: str) -> ConversationTemplate:
    """The template called ``name``; ValueError listing the valid names otherwise."""
    if name not in TEMPLATES:
        raise ValueError(f"chat template {name!r} is unknown; valid templates are {sorted(TEMPLATES)}.")
    return TEMPLATES[name]


def check_eos(tokenizer, template: ConversationTemplate, where: str) -> None:
    """Make ``tokenizer``'s EOS the template's sep2 (the token MoE-LLaVA closes answers and stops at).

    A tokenizer whose EOS differs but whose vocabulary holds sep2 as one token gets it as EOS (MoE-LLaVA's
    own training sets Qwen-1's EOS this way); one without it is an error naming the fix."""
    if tokenizer.eos_token == template.sep2:
        return
    ids = tokenizer.convert_tokens_to_ids([template.sep2])
    if ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ValueError(
            f"{where}: the tokenizer has no {template.sep2!r} token, which template {template.name!r} ends "
            f"every answer with (MoE-LLaVA's sep2); use the backbone's own tokenizer (--tokenizer)."
        )
    tokenizer.eos_token = template.sep2


def apply_template(tokenizer, name: str) -> None:
    """Set ``tokenizer.chat_template`` to the template called ``name`` (saved with the tokenizer)."""
    tokenizer.chat_template = get_template(name).jinja()
