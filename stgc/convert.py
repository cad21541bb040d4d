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
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from stgc.backbones import backbone_for_text_config, get_backbone
from stgc.config import MoEConfig
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

# Source config fields under other names (StableLM's remote code, Qwen-1) -> transformers field
CONFIG_ALIASES = {
    "rope_pct": "partial_rotary_factor",
    "rotary_pct": "partial_rotary_factor",
    "norm_eps": "layer_norm_eps",
    "rotary_emb_base": "rope_theta",
    "seq_length": "max_position_embeddings",
}
# Keys MoE-LLaVA-era checkpoints hold that are recomputed buffers here.
IGNORED_SOURCE_KEYS = re.compile(r"rotary_emb\.inv_freq$")
IMAGE_TOWER_PREFIX = "model.image_tower.image_tower."


@dataclasses.dataclass
class _Recipe:
    """How one target tensor is made from source tensors."""

    sources: list[str]
    combine: Callable[[list[Tensor]], Tensor]


def _one(ts: list[Tensor]) -> Tensor:
    return ts[0]


def _chunk(j: int) -> Callable[[list[Tensor]], Tensor]:
    return lambda ts: ts[0].chunk(3, dim=0)[j]


def _stack_swiglu(E: int) -> Callable[[list[Tensor]], Tensor]:
    # sources: gate_0, up_0, gate_1, up_1, ... -> w_in_EHD with [gate; up] per expert
    return lambda ts: torch.stack([torch.cat([ts[2 * e], ts[2 * e + 1]], dim=0) for e in range(E)])


def _stack(ts: list[Tensor]) -> Tensor:
    return torch.stack(ts)


def _lm_source(rest: str, naming: str) -> _Recipe:
    """The source of a language-model tensor ``model.language_model.<rest>`` (dense parts)."""
    if naming == "hf":
        return _Recipe([f"model.{rest}"], _one)
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", rest)
    if m is None:
        table = {"embed_tokens.weight": "transformer.wte.weight", "norm.weight": "transformer.ln_f.weight"}
        if rest not in table:
            raise ValueError(f"no Qwen-1 source for language-model tensor {rest!r}")
        return _Recipe([table[rest]], _one)
    i, sub = m.groups()
    h = f"transformer.h.{i}"
    qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", sub)
    if qkv:
        return _Recipe([f"{h}.attn.c_attn.{qkv.group(2)}"], _chunk("qkv".index(qkv.group(1))))
    table = {
        "input_layernorm.weight": "ln_1.weight",
        "post_attention_layernorm.weight": "ln_2.weight",
        "self_attn.o_proj.weight": "attn.c_proj.weight",
        "mlp.gate_proj.weight": "mlp.w2.weight",
        "mlp.up_proj.weight": "mlp.w1.weight",
        "mlp.down_proj.weight": "mlp.c_proj.weight",
    }
    if sub not in table:
        raise ValueError(f"no Qwen-1 source for language-model tensor {rest!r}")
    return _Recipe([f"{h}.{table[sub]}"], _one)


def _moe_sources(i: int, param: str, E: int, ffn: str, naming: str) -> _Recipe:
    """Router / expert-bank tensor of MoE layer ``i`` from DeepSpeed's per-expert modules."""
    layer = f"transformer.h.{i}" if naming == "qwen1" else f"model.layers.{i}"
    ds = f"{layer}.mlp.deepspeed_moe"
    if param == "router.weight":
        return _Recipe([f"{ds}.gate.wg.weight"], _one)
    ex = f"{ds}.experts.deepspeed_experts"
    gate, up, down = ("w2", "w1", "c_proj") if naming == "qwen1" else ("gate_proj", "up_proj", "down_proj")
    if ffn == "swiglu":
        if param == "experts.w_in":
            srcs = [f"{ex}.{e}.{n}.weight" for e in range(E) for n in (gate, up)]
            return _Recipe(srcs, _stack_swiglu(E))
        if param == "experts.w_out":
            return _Recipe([f"{ex}.{e}.{down}.weight" for e in range(E)], _stack)
    else:
        name = {
            "experts.w_in": "fc1.weight",
            "experts.b_in": "fc1.bias",
            "experts.w_out": "fc2.weight",
            "experts.b_out": "fc2.bias",
        }.get(param)
        if name is not None:
            return _Recipe([f"{ex}.{e}.{name}" for e in range(E)], _stack)
    raise ValueError(f"no DeepSpeed-MoE source for MoE tensor {param!r} of layer {i}")


def build_recipes(
    target_keys: list[str], config: MoELlavaConfig, naming: str, projector_prefix: str
) -> dict[str, _Recipe]:
    """Target tensor name -> recipe, for every tensor except the vision tower's."""
    moe = config.moe_config
    ffn = backbone_for_text_config(config.text_config).ffn
    moe_layers = set(config.moe_layers)
    recipes: dict[str, _Recipe] = {}
    for key in target_keys:
        if key.startswith("model.vision_tower."):
            continue
        if key.startswith("lm_head."):
            recipes[key] = _Recipe([key], _one)
        elif key.startswith("model.multi_modal_projector."):
            m = re.fullmatch(r"model\.multi_modal_projector\.linear_([12])\.(weight|bias)", key)
            idx = {"1": 0, "2": 2}[m.group(1)]
            recipes[key] = _Recipe([f"{projector_prefix}.image_spatial_proj.{idx}.{m.group(2)}"], _one)
        elif key.startswith("model.language_model."):
            rest = key[len("model.language_model.") :]
            m = re.fullmatch(r"layers\.(\d+)\.mlp\.(.+)", rest)
            if m and int(m.group(1)) in moe_layers:
                recipes[key] = _moe_sources(int(m.group(1)), m.group(2), moe.num_experts, ffn, naming)
            else:
                recipes[key] = _lm_source(rest, naming)
        else:
            raise ValueError(f"target tensor {key!r} has no known source")
    return recipes


# --------------------------------------------------------------------------------------------------------
# reading the source folder


def load_state_dict(src: Path) -> dict[str, Tensor]:
    """All tensors of ``pytorch_model.bin`` (or its shards, or safetensors), code-free loading only."""
    index = src / "pytorch_model.bin.index.json"
    st_index = src / "model.safetensors.index.json"
    if (src / "pytorch_model.bin").exists():
        files = [src / "pytorch_model.bin"]
    elif index.exists():
        files = [src / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    elif (src / "model.safetensors").exists():
        files = [src / "model.safetensors"]
    elif st_index.exists():
        files = [src / f for f in sorted(set(json.loads(st_index.read_text())["weight_map"].values()))]
    else:
        raise ValueError(
            f"{src} holds no pytorch_model.bin, pytorch_model.bin.index.json or model.safetensors; "
            "point at a MoE-LLaVA checkpoint folder."
        )
    state: dict[str, Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(f))
            continue
        try:
            # weights_only: tensors and plain containers only; a pickle that would run code is refused
            state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=_is_zip(f)))
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"refusing to load {f}: it is not a plain tensor pickle (weights_only=True failed: {err}). "
                "Re-save it as plain tensors or safetensors from a trusted environment."
            ) from err
    return state


def _is_zip(path: Path) -> bool:
    """torch's zip format can be memory-mapped (no copy of a multi-GB file in RAM); the legacy one cannot."""
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def _text_config_kwargs(src_cfg: dict, backbone: str) -> dict:
    """The text config fields of a MoE-LLaVA config.json (aliases resolved; LLaVA / MoE keys left out)."""
    fields = {f.name for f in dataclasses.fields(get_backbone(backbone).config_class)}
    legacy = {"rope_theta", "partial_rotary_factor"}  # transformers folds these into rope_parameters
    out: dict = {}
    for key, value in src_cfg.items():
        key = CONFIG_ALIASES.get(key, key)
        if src_cfg.get("model_type") == "moe_llava_qwen" and key == "layer_norm_epsilon":
            key = "rms_norm_eps"
        if key in fields | legacy and key not in ("model_type", "architectures"):
            out.setdefault(key, value)
    if src_cfg.get("model_type") == "moe_llava_qwen":
        # Qwen-1 states the summed width of w1 and w2 (11008 for 1.8B); each is half of it
        out["intermediate_size"] = src_cfg["intermediate_size"] // 2
        out.setdefault("num_key_value_heads", src_cfg["num_attention_heads"])
    out.pop("rope_scaling", None)
    return out


def _moe_config(src_cfg: dict, num_hidden_layers: int, reproduce_moellava: bool) -> MoEConfig:
    moe = src_cfg.get("moe")
    if not isinstance(moe, dict):
        raise ValueError(
            "config.json has no 'moe' dict; is this a MoE-LLaVA stage-III (MoE-tuned) checkpoint?"
        )
    if moe.get("use_residual"):
        raise ValueError(
            "moe.use_residual=True (Residual MoE) is not supported; only plain MoE layers convert."
        )
    layers = tuple(moe.get("moe_layers_idx") or range(0, num_hidden_layers, 2))
    counts = moe.get("num_experts", 4)
    counts = counts if isinstance(counts, list) else [counts] * len(layers)
    if len(set(counts)) != 1 or len(counts) != len(layers):
        raise ValueError(
            f"moe.num_experts={counts} for moe_layers_idx={list(layers)}: one expert count per MoE layer, "
            "the same for all, is supported."
        )
    kwargs = dict(
        num_experts=int(counts[0]),
        top_k=int(moe.get("top_k_experts", 2)),
        layers=layers,
        aux_loss_coef=float(moe.get("router_aux_loss_coef", 0.01)),
    )
    if reproduce_moellava:
        # MoE-LLaVA's routing: DeepSpeed's capacity (its training and evaluation factors where MoEConfig has
        # both, else the evaluation one), sampled 2nd expert, padding routed
        train_cf = float(moe.get("capacity_factor", 1.0))
        eval_cf = float(moe.get("eval_capacity_factor", train_cf))
        if "eval_capacity_factor" in {f.name for f in dataclasses.fields(MoEConfig)}:
            kwargs.update(capacity_factor=train_cf, eval_capacity_factor=eval_cf)
        else:
            kwargs.update(capacity_factor=eval_cf)
        kwargs.update(
            min_capacity=int(moe.get("min_capacity", 0)),
            second_expert_sampling=kwargs["top_k"] == 2,
            sample_at_eval=kwargs["top_k"] == 2,
            route_padding=True,
        )
    return MoEConfig(**kwargs)


def _load_vision_tower(src: Path, src_cfg: dict, state: dict[str, Tensor], override: str | Path | None):
    """(CLIP vision config, {CLIPVisionModel key: tensor}) from the checkpoint or the tower folder."""
    from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel

    in_ckpt = {
        k[len(IMAGE_TOWER_PREFIX) :]: state.pop(k) for k in list(state) if k.startswith(IMAGE_TOWER_PREFIX)
    }
    path = override or src_cfg.get("mm_image_tower") or src_cfg.get("image_tower")
    if path is None or not Path(path).is_dir():
        raise ValueError(
            f"the CLIP image tower folder {path!r} (config mm_image_tower / image_tower) is not a local "
            "folder; pass vision_tower_path= (--vision-tower) pointing at a CLIP checkpoint saved with "
            "save_pretrained."
        )
    cfg = AutoConfig.from_pretrained(path)
    vision_cfg = cfg.vision_config if not isinstance(cfg, CLIPVisionConfig) else cfg
    if in_ckpt:
        return vision_cfg, {k.removeprefix("vision_model."): v for k, v in in_ckpt.items()}
    tower = CLIPVisionModel.from_pretrained(path)
    return tower.config, dict(tower.state_dict())


ASPECT_RATIOS = ("pad", "square")  # LLaVA's image_aspect_ratio values that a processor setting reproduces


def _tokenizer(src: Path, tokenizer_path: str | Path | None, trust_remote_code: bool):
    """The checkpoint's tokenizer (or ``tokenizer_path``'s), loaded offline; ValueError naming what to pass
    or install when it cannot be."""
    from transformers import AutoTokenizer

    path = Path(tokenizer_path) if tokenizer_path is not None else src
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    remote = (cfg.get("auto_map") or {}).get("AutoTokenizer")
    remote = next((r for r in remote if r), None) if isinstance(remote, list) else remote
    offline_route = (
        "or pass --tokenizer <folder of a fast tokenizer with the same vocabulary> (Qwen-1: Qwen1.5's, e.g. "
        "Qwen/Qwen1.5-1.8B, which keeps Qwen-1's BPE ranks and special-token ids)"
    )
    if not cfg_file.is_file() and not (path / "tokenizer.json").is_file():
        raise ValueError(
            f"{path} holds no tokenizer (no tokenizer_config.json / tokenizer.json), and every converted "
            "checkpoint needs one for its processor; pass --tokenizer <the backbone's tokenizer folder>."
        )
    if remote and not trust_remote_code:
        raise ValueError(
            f"the tokenizer in {path} is remote code ({remote}); pass --trust-remote-code to run it "
            f"(Qwen-1's needs `pip install tiktoken`), {offline_route}."
        )
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=bool(remote) and trust_remote_code)
    except Exception as err:  # noqa: BLE001 - any failure: the message below names the way out
        what = f"remote-code tokenizer {remote}" if remote else "tokenizer"
        raise ValueError(
            f"the {what} in {path} does not load offline ({type(err).__name__}: {_one_line(err)}); install "
            f"what it imports (Qwen-1: `pip install tiktoken`) {offline_route}."
        ) from None
    if remote:
        # the converted checkpoint must load without remote code (the lmms-eval adapter, AutoProcessor):
        # a fast tokenizer keeps its tokenizers-library object, a slow (Python) one has nothing to keep
        if not tok.is_fast:
            raise ValueError(
                f"the remote-code tokenizer {remote} in {path} loads, but it is a slow (Python) tokenizer "
                "that the converted checkpoint could only load by running that code; "
                f"{offline_route.removeprefix('or ')}."
            )
        tok = _plain_fast(tok)
    if IMAGE_TOKEN not in tok.get_vocab():
        try:
            tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        except Exception as err:  # noqa: BLE001 - e.g. QWenTokenizer refuses tokens outside its list
            raise ValueError(
                f"the tokenizer in {path} ({type(tok).__name__}) cannot add the {IMAGE_TOKEN!r} token "
                f"({_one_line(err)}); {offline_route.removeprefix('or ')}."
            ) from None
    if tok.pad_token is None:  # MoE-LLaVA's training and evaluation pad with the unknown token
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def _plain_fast(tok):
    """A ``PreTrainedTokenizerFast`` holding a remote-code fast tokenizer's vocabulary, merges, normaliser
    and special tokens (its tokenizers-library object), saved and loaded without the remote code."""
    from transformers import PreTrainedTokenizerFast

    specials = {k: v for k, v in tok.special_tokens_map.items() if k != "additional_special_tokens"}
    extra = [
        t for t in tok.special_tokens_map.get("additional_special_tokens", []) if t not in specials.values()
    ]
    plain = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, **specials)
    if extra:
        plain.add_special_tokens({"additional_special_tokens": extra})
    plain.padding_side = tok.padding_side
    return plain


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _aspect_ratio(src: Path, src_cfg: dict, override: str | None) -> str:
    """The image preprocessing of the source (``image_aspect_ratio``: "pad" or "square")."""
    ratio = override or src_cfg.get("image_aspect_ratio")
    if ratio is None:
        raise ValueError(
            f"{src}/config.json has no image_aspect_ratio, so the image preprocessing of this checkpoint is "
            "unknown; pass --image-aspect-ratio pad (MoE-LLaVA's released models) or square."
        )
    if ratio not in ASPECT_RATIOS:
        raise ValueError(
            f"image_aspect_ratio={ratio!r} is not supported; valid: {', '.join(ASPECT_RATIOS)} (pad: "
            "expand2square with the image mean, square: resize and centre crop)."
        )
    return ratio


# --------------------------------------------------------------------------------------------------------


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


def _check_key_sets(expected: set[str], present: set[str], src: Path) -> None:
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise ValueError(
            f"{src}: the checkpoint's tensors do not match a MoE-LLaVA model of this config: "
            f"{len(missing)} missing (first: {missing[:10]}), {len(unexpected)} unexpected (first: "
            f"{unexpected[:10]}). Check moe_layers_idx / num_experts / model_type in config.json."
        )


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
