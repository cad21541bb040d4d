"""`stgc convert`: a MoE-LLaVA (DeepSpeed-MoE) checkpoint folder -> this project's checkpoint folder.

MoE-LLaVA saves a DeepSpeed MoE layer per MoE decoder layer: router ``...mlp.deepspeed_moe.gate.wg.weight``
and experts ``...mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{gate_proj,up_proj,down_proj | fc1,fc2}``;
the projector as ``model.mm_projector.image_spatial_proj.{0,2}``; everything else under the usual Hugging
Face names (``model.embed_tokens``, ``model.layers.{i}.self_attn...``, ``model.norm`` /
``model.final_layernorm``, ``lm_head``). Qwen-1.8B runs on Qwen's own (remote-code) model, whose names are
``transformer.wte``, ``transformer.h.{i}.attn.c_attn`` (fused q/k/v), ``mlp.w1/w2/c_proj``,
``transformer.ln_f``: they are mapped onto the Qwen2 layout (w2 is the gate, w1 the up projection).
The CLIP tower comes from the folder the checkpoint's config names (``mm_image_tower`` / ``image_tower``),
or from an override path, unless the checkpoint carries it (``model.image_tower.image_tower.*``).

Weights are read with ``torch.load(weights_only=True)``: a pickle that carries code is refused. The output
is safetensors only. A key set that is not exactly the expected one is an error, never a partial load.

Every converted folder also holds a processor (tokenizer with ``<image>`` + image processor) that evaluates
the way MoE-LLaVA does: the tokenizer's chat template is MoE-LLaVA's conversation template of that backbone
(``stgc.data.chat_templates``; its EOS is the template's sep2), and images are padded to a square with the
image mean when the source config says ``image_aspect_ratio: pad``. The tokenizer comes from the source
folder or ``--tokenizer``; a remote-code tokenizer (Qwen-1's tiktoken ``QWenTokenizer``) loads only with
``--trust-remote-code`` and the packages it imports, and must accept ``<image>`` as an added token
(``QWenTokenizer`` does not): a fast tokenizer of the same vocabulary (Qwen1.5's has Qwen-1's BPE ranks and
special-token ids) is the offline route. Everything is checked before anything is written.

The tensor-name mapping is in ``stgc.convert_keys``, the reading of the source folder (weights, config,
CLIP tower, tokenizer) in ``stgc.convert_source``; this module puts them together and writes the folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from stgc.backbones import get_backbone
from stgc.convert_keys import IGNORED_SOURCE_KEYS, _check_key_sets, build_recipes
from stgc.convert_source import (
    ASPECT_RATIOS,
    CONFIG_ALIASES,
    IMAGE_TOWER_PREFIX,
    _aspect_ratio,
    _load_vision_tower,
    _moe_config,
    _text_config_kwargs,
    _tokenizer,
    load_state_dict,
)
from stgc.data.chat_templates import FOR_MODEL_TYPE, check_eos, get_template
from stgc.modeling import (
    IMAGE_TOKEN,
    MoELlavaConfig,
    MoELlavaForConditionalGeneration,
    build_processor,
)

# MoE-LLaVA model_type -> (registry backbone, source naming)
MODEL_TYPES: dict[str, tuple[str, str]] = {
    "moe_llava_stablelm": ("stablelm", "hf"),
    "moe_llava_phi": ("phi", "hf"),
    "moe_llava_qwen": ("qwen2", "qwen1"),
    "moe_llava_qwen1.5": ("qwen2", "hf"),
    "moe_llava_llama": ("llama", "hf"),
}


# --------------------------------------------------------------------------------------------------------
# the conversion


def convert_moe_llava(
    src: str | Path,
    out: str | Path,
    *,
    vision_tower_path: str | Path | None = None,
    image_token_id: int | None = None,
    reproduce_moellava_routing: bool = False,
    tokenizer_path: str | Path | None = None,
    trust_remote_code: bool = False,
    image_aspect_ratio: str | None = None,
    chat_template: str | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Convert a MoE-LLaVA checkpoint folder into a folder ``AutoModelForImageTextToText`` loads, with the
    processor that evaluates it the way MoE-LLaVA does (module docstring).

    image_token_id: the vocabulary row ``<image>`` must get (a check; MoE-LLaVA splices images at the
        sentinel id -200, which has no row). ``<image>`` is added to the tokenizer: its first free row (the
        embedding matrices of these models have spare rows).
    reproduce_moellava_routing: MoE-LLaVA's routing (DeepSpeed's capacity factors, Gumbel 2nd expert,
        padding routed); off by default: deterministic routing, padding masked (docs/method.md 1).
    tokenizer_path: a tokenizer folder to use instead of the checkpoint's own (same vocabulary).
    trust_remote_code: run a remote-code tokenizer of the source folder (Qwen-1's).
    image_aspect_ratio: "pad" / "square", overriding (or standing in for) the source config's value.
    chat_template: a ``stgc.data.chat_templates`` name overriding the backbone's MoE-LLaVA template.
    """
    from transformers import GenerationConfig, LlavaConfig

    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise ValueError(
            f"{src} is not a MoE-LLaVA checkpoint folder (no config.json); pass the folder that holds "
            "config.json and pytorch_model.bin (or its shards)."
        )
    src_cfg = json.loads((src / "config.json").read_text())
    mtype = src_cfg.get("model_type")
    if mtype not in MODEL_TYPES:
        raise ValueError(
            f"model_type={mtype!r} is not a supported MoE-LLaVA model; valid: {sorted(MODEL_TYPES)}."
        )
    backbone, naming = MODEL_TYPES[mtype]
    projector = src_cfg.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise ValueError(
            f"mm_projector_type={projector!r} is not supported; only 'mlp2x_gelu' (LLaVA-1.5) is."
        )
    # the processor's parts first: a missing setting fails before the weights are read
    aspect_ratio = _aspect_ratio(src, src_cfg, image_aspect_ratio)
    template = get_template(chat_template or FOR_MODEL_TYPE[mtype])
    tok = _tokenizer(src, tokenizer_path, trust_remote_code)
    check_eos(tok, template, f"tokenizer of {tokenizer_path or src}")
    tok.chat_template = template.jinja()
    text_kwargs = _text_config_kwargs(src_cfg, backbone)
    text_cfg = get_backbone(backbone).config_class(**text_kwargs)
    got_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id is not None and image_token_id != got_id:
        raise ValueError(
            f"image_token_id={image_token_id}, but the tokenizer puts {IMAGE_TOKEN} at row {got_id}; drop "
            "--image-token-id or use a tokenizer whose <image> token has that id."
        )
    image_token_id = got_id
    if not 0 <= image_token_id < text_cfg.vocab_size or len(tok) > text_cfg.vocab_size:
        raise ValueError(
            f"the tokenizer with {IMAGE_TOKEN} has {len(tok)} tokens ({IMAGE_TOKEN} at row "
            f"{image_token_id}), more than the embedding's {text_cfg.vocab_size} rows; use the checkpoint's "
            "own tokenizer."
        )

    state = load_state_dict(src)
    vision_cfg, vision_state = _load_vision_tower(src, src_cfg, state, vision_tower_path)
    select = src_cfg.get("mm_vision_select_feature", "patch")
    llava_cfg = LlavaConfig(
        vision_config=vision_cfg,
        text_config=text_cfg,
        image_token_id=image_token_id,
        image_seq_length=(vision_cfg.image_size // vision_cfg.patch_size) ** 2,
        vision_feature_layer=src_cfg.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=text_cfg.tie_word_embeddings,
        pad_token_id=src_cfg.get("pad_token_id", tok.pad_token_id),
    )
    moe = _moe_config(src_cfg, text_cfg.num_hidden_layers, reproduce_moellava_routing)
    config = MoELlavaConfig.from_llava_config(llava_cfg, moe, {"name": "baseline"})
    with torch.device("meta"):
        target_keys = list(MoELlavaForConditionalGeneration(config).state_dict())

    prefix = (
        "transformer.mm_projector" if any(k.startswith("transformer.mm_projector.") for k in state) else None
    )
    recipes = build_recipes(target_keys, config, naming, prefix or "model.mm_projector")
    expected = {s for r in recipes.values() for s in r.sources}
    present = {k for k in state if not IGNORED_SOURCE_KEYS.search(k)}
    _check_key_sets(expected, present, src)

    converted: dict[str, Tensor] = {}
    for key, recipe in recipes.items():
        tensor = recipe.combine([state[s] for s in recipe.sources])
        if key.endswith("mlp.router.weight"):
            tensor = tensor.float()  # the router runs in fp32 (stgc.moe)
        converted[key] = tensor.contiguous().clone()
    vision_keys = [k for k in target_keys if k.startswith("model.vision_tower.")]
    missing_v = [k for k in vision_keys if k[len("model.vision_tower.") :] not in vision_state]
    if missing_v:
        raise ValueError(f"the CLIP tower lacks {len(missing_v)} tensors, e.g. {missing_v[:10]}")
    for k in vision_keys:
        converted[k] = vision_state[k[len("model.vision_tower.") :]].contiguous().clone()
    del state

    out.mkdir(parents=True, exist_ok=True)
    dtypes = {t.dtype for k, t in converted.items() if "lm_head" in k or "embed_tokens" in k}
    config.dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
    config.architectures = [MoELlavaForConditionalGeneration.__name__]
    config.save_pretrained(out)
    GenerationConfig(
        bos_token_id=text_cfg.bos_token_id,
        eos_token_id=tok.eos_token_id,  # the template's sep2: where MoE-LLaVA's generation stops
        pad_token_id=llava_cfg.pad_token_id,
    ).save_pretrained(out)
    _save_safetensors(converted, out, max_shard_size)
    processor = build_processor(
        tok, vision_cfg.image_size, vision_cfg.patch_size, pad_to_square=aspect_ratio == "pad"
    )
    processor.save_pretrained(out)
    (out / "conversion.json").write_text(
        json.dumps(
            {
                "source": str(src.resolve()),
                "source_model_type": mtype,
                "source_moe": src_cfg.get("moe"),
                "vision_tower": str(
                    vision_tower_path or src_cfg.get("mm_image_tower") or src_cfg.get("image_tower")
                ),
                "tokenizer": str(Path(tokenizer_path or src).resolve()),
                "image_token_id": image_token_id,
                "chat_template": template.name,
                "image_aspect_ratio": aspect_ratio,
                "reproduce_moellava_routing": reproduce_moellava_routing,
                "tensors": len(converted),
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            },
            indent=2,
        )
    )
    return out


def _save_safetensors(state: dict[str, Tensor], out: Path, max_shard_size: str) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}}
        index["weight_map"] = split.tensor_to_filename
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# --------------------------------------------------------------------------------------------------------
# CLI


def run(args: argparse.Namespace) -> int:
    try:
        out = convert_moe_llava(
            args.src,
            args.out,
            vision_tower_path=args.vision_tower,
            image_token_id=args.image_token_id,
            reproduce_moellava_routing=args.reproduce_moellava_routing,
            tokenizer_path=args.tokenizer,
            trust_remote_code=args.trust_remote_code,
            image_aspect_ratio=args.image_aspect_ratio,
            chat_template=args.chat_template,
        )
    except ValueError as err:
        print(f"stgc convert: error: {err}", file=sys.stderr)
        return 2
    print(f"converted {args.src} -> {out}")
    return 0


__all__ = [
    "ASPECT_RATIOS",
    "CONFIG_ALIASES",
    "IGNORED_SOURCE_KEYS",
    "IMAGE_TOWER_PREFIX",
    "MODEL_TYPES",
    "build_recipes",
    "convert_moe_llava",
    "load_state_dict",
    "run",
]
