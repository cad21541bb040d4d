"""Registry of text backbones and model sizes (docs/method.md section 1).

A backbone is a transformers text-model family whose MLP the MoE block replaces; a size is a set of
dimensions for its text config plus a CLIP vision tower. ``tiny`` runs on a CPU in seconds (tests, the
embedded default), ``small`` fits one GPU (~100M parameters with 4 experts), ``full`` is the language
model MoE-LLaVA used for that backbone (StableLM-2-1.6B, Qwen-1.8B as a Qwen2-class model, Phi-2-2.7B)
with CLIP ViT-L/14-336. ``full`` configs are meant for conversion and real training; tests only
construct them (on the meta device to count parameters).

Nothing here branches on a backbone name outside the registry: the model reads the FFN kind and the MLP
parameter names from the ``Backbone`` entry of the text config's ``model_type`` (docs/architecture.md,
Conventions).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    PhiConfig,
    PretrainedConfig,
    Qwen2Config,
    StableLmConfig,
)


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One text-model family.

    model_type: the transformers ``model_type`` of its text config.
    ffn: the MoE block's FFN kind ("swiglu": gate/up/down without bias; "gelu": fc1/fc2 with biases).
    sizes: size name -> keyword arguments of ``config_class`` (vocab and special tokens set by the caller).
    """

    name: str
    model_type: str
    config_class: type[PretrainedConfig]
    ffn: str
    sizes: dict[str, dict[str, Any]]

    def text_config(
        self, size: str, *, vocab_size: int | None = None, pad_token_id: int | None = None, **overrides: Any
    ) -> PretrainedConfig:
        """The text config of ``size``; ``vocab_size`` defaults to the real model's where it has one."""
        if size not in self.sizes:
            raise ValueError(
                f"size={size!r} is not defined for backbone {self.name!r}; "
                f"valid sizes are {sorted(self.sizes)}."
            )
        kwargs = dict(self.sizes[size])
        if vocab_size is not None:
            kwargs["vocab_size"] = vocab_size
        if "vocab_size" not in kwargs:
            raise ValueError(
                f"backbone {self.name!r} size {size!r} has no default vocabulary; pass vocab_size= (the "
                "tokenizer's length including the <image> token)."
            )
        kwargs["pad_token_id"] = pad_token_id
        kwargs.update(overrides)
        return self.config_class(**kwargs)


# --------------------------------------------------------------------------------------------------------
# vision towers (CLIP) and the LLaVA wiring that goes with each

# image_size / patch_size -> (image_size // patch_size)^2 patch tokens; the "default" feature strategy
# drops CLS, so the LM sees exactly that many image tokens.
VISION_SIZES: dict[str, dict[str, Any]] = {
    # 48 px / patch 16 -> 9 image tokens, one per cell of the mini suite's 3 x 3 scene grid
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=48,
        patch_size=16,
    ),
    # ViT-S/16-like at 224 px -> 196 image tokens
    "small": dict(
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=6,
        image_size=224,
        patch_size=16,
    ),
    # openai/clip-vit-large-patch14-336 vision_config: hidden 1024, 24 layers, 16 heads, MLP 4096,
    # quick_gelu, 336 px / patch 14 -> 576 patch tokens (+ CLS)
    "vit_l_14_336": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    ),
}

# LLaVA-1.5 / MoE-LLaVA wiring: features of the second-to-last CLIP layer (mm_vision_select_layer -2),
# patch tokens only (mm_vision_select_feature "patch" == "default" strategy), projector
# mlp2x_gelu = Linear(Dv, D) -> GELU -> Linear(D, D) with biases.
LLAVA_WIRING: dict[str, Any] = dict(
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
    projector_hidden_act="gelu",
    multimodal_projector_bias=True,
)

# Which vision size goes with each model size.
VISION_FOR_SIZE = {"tiny": "tiny", "small": "small", "full": "vit_l_14_336"}


def vision_config(size: str) -> CLIPVisionConfig:
    """The CLIP vision config of a model size (``tiny``, ``small``, ``full``) or a vision size name."""
    name = VISION_FOR_SIZE.get(size, size)
    if name not in VISION_SIZES:
        raise ValueError(
            f"vision size {size!r} is unknown; valid sizes are {sorted(VISION_FOR_SIZE)} or vision sizes "
            f"{sorted(VISION_SIZES)}."
        )
    return CLIPVisionConfig(**VISION_SIZES[name])


def num_image_tokens(vision: CLIPVisionConfig) -> int:
    """Image tokens the LM sees per image under the "default" strategy (CLS dropped)."""
    return (vision.image_size // vision.patch_size) ** 2


# --------------------------------------------------------------------------------------------------------
# text backbones

_ROPE = {"rope_type": "default", "rope_theta": 10000.0}

# tiny: seconds on a CPU; each keeps its family's quirks (qkv bias, partial rotary, LayerNorm, biases)
_TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
)
# small: ~100M parameters in all with 4 experts in every other layer and an 8k vocabulary (75M active)
_SMALL = dict(
    hidden_size=640,
    intermediate_size=1728,
    num_hidden_layers=8,
    num_attention_heads=10,
    num_key_value_heads=10,
)

BACKBONES: dict[str, Backbone] = {
    "llama": Backbone(
        name="llama",
        model_type="llama",
        config_class=LlamaConfig,
        ffn="swiglu",
        sizes={
            "tiny": dict(
                _TINY, rope_parameters=dict(_ROPE), max_position_embeddings=2048, tie_word_embeddings=False
            ),
            "small": dict(
                _SMALL, rope_parameters=dict(_ROPE), max_position_embeddings=2048, tie_word_embeddings=False
            ),
        },
    ),
    "qwen2": Backbone(
        name="qwen2",
        model_type="qwen2",
        config_class=Qwen2Config,
        ffn="swiglu",
        sizes={
            "tiny": dict(_TINY, rope_parameters=dict(_ROPE), max_position_embeddings=2048),
            "small": dict(_SMALL, rope_parameters=dict(_ROPE), max_position_embeddings=2048),
            # Qwen/Qwen-1_8B config.json: hidden_size 2048, intermediate_size 11008 (its MLP halves it:
            # w1/w2 are 2048 -> 5504), num_attention_heads 16 (kv_channels 128), num_hidden_layers 24,
            # vocab_size 151936, layer_norm_epsilon 1e-6, rotary_emb_base 10000, rotary_pct 1.0,
            # seq_length 8192, no_bias true (c_attn keeps its bias -> Qwen2's q/k/v biases),
            # tie_word_embeddings false.
            "full": dict(
                hidden_size=2048,
                intermediate_size=5504,
                num_hidden_layers=24,
                num_attention_heads=16,
                num_key_value_heads=16,
                vocab_size=151936,
                rms_norm_eps=1e-6,
                rope_parameters=dict(_ROPE),
                max_position_embeddings=8192,
                tie_word_embeddings=False,
            ),
        },
    ),
    "phi": Backbone(
        name="phi",
        model_type="phi",
        config_class=PhiConfig,
        ffn="gelu",
        sizes={
            "tiny": dict(
                _TINY,
                rope_parameters=dict(_ROPE, partial_rotary_factor=0.4),
                max_position_embeddings=2048,
                hidden_act="gelu_new",
            ),
            "small": dict(
                _SMALL,
                intermediate_size=2560,  # 4 x hidden, as Phi-2 (its GELU MLP has two matrices, not three)
                num_attention_heads=8,  # head_dim 80 as Phi-2, so that 0.4 of it (32) is an even rotary dim
                num_key_value_heads=8,
                rope_parameters=dict(_ROPE, partial_rotary_factor=0.4),
                max_position_embeddings=2048,
                hidden_act="gelu_new",
            ),
            # microsoft/phi-2 config.json: hidden_size 2560, intermediate_size 10240, num_hidden_layers 32,
            # num_attention_heads 32, partial_rotary_factor 0.4, rope_theta 10000, vocab_size 51200,
            # hidden_act gelu_new, layer_norm_eps 1e-5, max_position_embeddings 2048, resid_pdrop 0.1,
            # qk_layernorm false, tie_word_embeddings false; fc1/fc2, q/k/v/dense and lm_head have biases.
            "full": dict(
                hidden_size=2560,
                intermediate_size=10240,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                vocab_size=51200,
                hidden_act="gelu_new",
                layer_norm_eps=1e-5,
                rope_parameters=dict(_ROPE, partial_rotary_factor=0.4),
                max_position_embeddings=2048,
                resid_pdrop=0.1,
                embd_pdrop=0.0,
                tie_word_embeddings=False,
                bos_token_id=50256,
                eos_token_id=50256,
            ),
        },
    ),
    "stablelm": Backbone(
        name="stablelm",
        model_type="stablelm",
        config_class=StableLmConfig,
        ffn="swiglu",
        sizes={
            "tiny": dict(
                _TINY,
                rope_parameters=dict(_ROPE, partial_rotary_factor=0.25),
                max_position_embeddings=2048,
                use_qkv_bias=True,
            ),
            "small": dict(
                _SMALL,
                rope_parameters=dict(_ROPE, partial_rotary_factor=0.25),
                max_position_embeddings=2048,
                use_qkv_bias=True,
            ),
            # stabilityai/stablelm-2-1_6b config.json: hidden_size 2048, intermediate_size 5632,
            # num_hidden_layers 24, num_attention_heads 32, num_key_value_heads 32, partial_rotary_factor
            # 0.25, rope_theta 10000, layer_norm_eps 1e-5 (LayerNorm with bias), use_qkv_bias true,
            # use_parallel_residual false, qk_layernorm false, vocab_size 100352, max_position_embeddings
            # 4096, tie_word_embeddings false, bos/eos 100257.
            "full": dict(
                hidden_size=2048,
                intermediate_size=5632,
                num_hidden_layers=24,
                num_attention_heads=32,
                num_key_value_heads=32,
                vocab_size=100352,
                layer_norm_eps=1e-5,
                rope_parameters=dict(_ROPE, partial_rotary_factor=0.25),
                max_position_embeddings=4096,
                use_qkv_bias=True,
                use_parallel_residual=False,
                qk_layernorm=False,
                tie_word_embeddings=False,
                bos_token_id=100257,
                eos_token_id=100257,
            ),
        },
    ),
}


def get_backbone(name: str) -> Backbone:
    """The registry entry for a backbone name (``llama``, ``qwen2``, ``phi``, ``stablelm``)."""
    if name not in BACKBONES:
        raise ValueError(f"backbone={name!r} is unknown; valid backbones are {sorted(BACKBONES)}.")
    return BACKBONES[name]


def backbone_for_text_config(text_config: PretrainedConfig) -> Backbone:
    """The registry entry whose ``model_type`` matches a text config (the model reads its FFN kind here)."""
    for bb in BACKBONES.values():
        if bb.model_type == text_config.model_type:
            return bb
    raise ValueError(
        f"text backbone model_type={text_config.model_type!r} is not supported by the MoE model; valid "
        f"model types are {sorted(bb.model_type for bb in BACKBONES.values())}."
    )


def text_config(
    backbone: str,
    size: str,
    *,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    **overrides: Any,
) -> PretrainedConfig:
    """The transformers text config of ``backbone`` at ``size`` (see ``Backbone.text_config``)."""
    return get_backbone(backbone).text_config(
        size, vocab_size=vocab_size, pad_token_id=pad_token_id, **overrides
    )
