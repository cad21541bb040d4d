"""The tensor-name mapping of ``stgc convert``: for every tensor of the converted model, the MoE-LLaVA
(DeepSpeed-MoE) source tensors it is made from and how (``build_recipes``: one tensor as is, Qwen-1's
fused q/k/v chunked, DeepSpeed's per-expert tensors stacked into an expert bank), and the check that the
source holds exactly the expected tensors (``_check_key_sets``). ``stgc.convert`` documents the names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from stgc.backbones import backbone_for_text_config
from stgc.modeling import MoELlavaConfig

# Keys MoE-LLaVA-era checkpoints hold that are recomputed buffers here.
IGNORED_SOURCE_KEYS = re.compile(r"rotary_emb\.inv_freq$")


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


def _check_key_sets(expected: set[str], present: set[str], src: Path) -> None:
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise ValueError(
            f"{src}: the checkpoint's tensors do not match a MoE-LLaVA model of this config: "
            f"{len(missing)} missing (first: {missing[:10]}), {len(unexpected)} unexpected (first: "
            f"{unexpected[:10]}). Check moe_layers_idx / num_experts / model_type in config.json."
        )
