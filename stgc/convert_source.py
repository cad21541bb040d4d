"""Reading a MoE-LLaVA checkpoint folder for ``stgc convert``: its tensors (code-free loading only), the
text and MoE settings of its config.json, the CLIP image tower, the tokenizer (with ``<image>``, loaded
offline) and the image preprocessing (``image_aspect_ratio``)."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import torch
from torch import Tensor

from stgc.backbones import get_backbone
from stgc.config import MoEConfig
from stgc.modeling import IMAGE_TOKEN

# Source config fields under other names (StableLM's remote code, Qwen-1) -> transformers field
CONFIG_ALIASES = {
    "rope_pct": "partial_rotary_factor",
    "rotary_pct": "partial_rotary_factor",
    "norm_eps": "layer_norm_eps",
    "rotary_emb_base": "rope_theta",
    "seq_length": "max_position_embeddings",
}
IMAGE_TOWER_PREFIX = "model.image_tower.image_tower."


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
