"""The MoE-LLaVA model as a transformers model (DESIGN.md "Contracts"; STGC.md section 1).

``MoELlavaForConditionalGeneration`` is transformers' ``LlavaForConditionalGeneration`` (CLIP vision tower,
2-layer GELU projector, causal LM) whose MLP at the configured decoder layers is a ``stgc.moe.MoEBlock``
(its router and expert bank as the MoE config names them).
Its config (``MoELlavaConfig``, model_type ``stgc_moe_llava``) carries the MoE settings and the routing
method, and both classes are registered with the Auto classes: after ``import stgc``,
``AutoModelForImageTextToText.from_pretrained(path)`` and ``AutoProcessor.from_pretrained(path)`` load a
checkpoint folder. The config class is defined in ``stgc.moe_llava_config`` (importable from here).

Routing leaves the model through a ``RoutingContext`` attached around each forward (``stgc.moe``); the
output carries ``aux_loss`` (unscaled, summed over MoE layers) and, when asked, the ``routing_records``.
The LM ``loss`` stays the pure language-modelling loss: coefficients are applied once, in the train step
(STYLE.md 1).

Shape legend: B batch, S sequence length of this forward (1 in a decode step), T = B*S, E experts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast
from transformers.utils.generic import can_return_tuple

from stgc.backbones import (
    LLAVA_WIRING,
    backbone_for_text_config,
    num_image_tokens,
    text_config,
    vision_config,
)
from stgc.config import MoEConfig
from stgc.moe import MoEBlock, RoutingContext, RoutingRecord, routing_context
from stgc.moe_llava_config import MoELlavaConfig, json_form

IMAGE_TOKEN = "<image>"
# modality codes written into RoutingContext.modality_BT (analysis maps them to "text" / "image")
MODALITY_TEXT, MODALITY_IMAGE = 0, 1

# Activations the MoE block's experts compute exactly (stgc.moe: SiLU-gated for swiglu, tanh-GELU for gelu).
_FFN_ACTIVATIONS = {"swiglu": ("silu", "swish"), "gelu": ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")}


@dataclasses.dataclass
class MoELlavaCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    """LLaVA's output plus the routing outputs.

    aux_loss: sum over MoE layers of the unscaled load-balancing loss (``RoutingRecord.aux_loss``); ``None``
        when this forward recorded no routing (evaluation without ``output_routing``), never a silent 0.
    routing_records: one ``RoutingRecord`` per MoE layer in execution order, when ``output_routing=True``.
    """

    aux_loss: Tensor | None = None
    routing_records: list[RoutingRecord] | None = None


def _mlp_kind(text_cfg) -> str:
    """The MoE block's FFN kind for a text config, checking that the dense activation is the one the block
    computes (a Phi with exact GELU would otherwise be upcycled into a slightly different function)."""
    ffn = backbone_for_text_config(text_cfg).ffn
    act = text_cfg.hidden_act
    if act not in _FFN_ACTIVATIONS[ffn]:
        raise ValueError(
            f"text backbone {text_cfg.model_type!r} has hidden_act={act!r}; its {ffn} MoE experts compute "
            f"{_FFN_ACTIVATIONS[ffn]}. Use one of those activations."
        )
    return ffn


class MoELlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA with MoE blocks at ``config.moe_layers`` (each replacing that decoder layer's ``mlp``)."""

    config_class = MoELlavaConfig
    config: MoELlavaConfig
    # The router is computed in fp32 (DeepSpeed's TopKGate does too); keep its weight fp32 when a checkpoint
    # is loaded in bf16/fp16 so that small logit differences are not rounded away.
    _keep_in_fp32_modules_strict = ["router"]

    def __init__(self, config: MoELlavaConfig):
        super().__init__(config)
        text_cfg = config.text_config
        ffn = _mlp_kind(text_cfg)
        moe_cfg = config.moe_config
        layers = self.model.language_model.layers
        for i in config.moe_layers:
            layers[i].mlp = MoEBlock(moe_cfg, text_cfg.hidden_size, text_cfg.intermediate_size, ffn, i)
        # Again, for the new blocks only (modules the parent's post_init initialised are flagged, skipped).
        self.post_init()
        # transformers initialises a module type it knows (nn.Linear: normal, std initializer_range); a
        # router is its own type, which the text model's init skips: give it the same
        std = getattr(text_cfg, "initializer_range", 0.02)
        for block in self.moe_blocks.values():
            block.router.init_weights(std)
        # MoCLE-style routers: the run's fitted instruction clusters (``stgc.clusters``), saved next to the
        # weights and loaded back with them, so that evaluation assigns prompts as training did
        self.instruction_clusters = None

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """Save with tensors under their in-memory names (``state_dict()`` keys, e.g.
        ``model.language_model.layers.0.mlp.experts.w_in``). transformers would otherwise rename keys to
        the legacy LLaVA layout, and differently for a freshly built and a reloaded model (5.23 writes
        ``model.language_model.model.layers...`` for the former); one layout is easier to read and convert.
        A model whose MoE banks are adapters on a frozen FFN (LoRA experts) saves them in their own file
        (``stgc.moe_adapters``); ``from_pretrained`` still loads the whole model. A model routing on
        instruction clusters saves them too (``instruction_clusters.json``, ``stgc.clusters``)."""
        from stgc.moe_adapters import adapter_keys, split_adapters

        out = super().save_pretrained(
            save_directory, *args, save_original_format=save_original_format, **kwargs
        )
        keys = adapter_keys(self)
        if keys and kwargs.get("is_main_process", True) and kwargs.get("safe_serialization", True):
            split_adapters(save_directory, keys)
        if self.instruction_clusters is not None and kwargs.get("is_main_process", True):
            self.instruction_clusters.save(save_directory)
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loading, plus the instruction clusters saved in the folder (if any)."""
        from stgc.clusters import InstructionClusters

        out = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = out[0] if isinstance(out, tuple) else out  # (model, info) with output_loading_info=True
        if Path(str(pretrained_model_name_or_path)).is_dir():
            model.instruction_clusters = InstructionClusters.load_if_present(pretrained_model_name_or_path)
        return out

    # ----------------------------------------------------------------------------------------------------
    @property
    def moe_blocks(self) -> dict[int, MoEBlock]:
        """Decoder-layer index -> MoE block."""
        layers = self.model.language_model.layers
        return {i: layers[i].mlp for i in self.config.moe_layers}

    def _routing_ctx(
        self,
        seq_len: int,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        routing_ctx: RoutingContext | None,
        need_records: bool,
        cluster_ids: Tensor | None = None,
    ) -> RoutingContext:
        """This forward's context: the caller's (never mutated) completed with the token mask of this
        forward's tokens, the modality codes and a records list where one is needed."""
        ctx = routing_ctx if routing_ctx is not None else RoutingContext()
        changes: dict[str, Any] = {}
        if ctx.token_mask_BT is None and attention_mask is not None and attention_mask.dim() == 2:
            # In a decode step the mask covers past + current tokens; the block sees the current ones only.
            changes["token_mask_BT"] = attention_mask[:, -seq_len:].bool()
        if ctx.modality_BT is None and input_ids is not None:
            is_image_BS = input_ids[:, -seq_len:] == self.config.image_token_id
            changes["modality_BT"] = torch.where(is_image_BS, MODALITY_IMAGE, MODALITY_TEXT)
        if ctx.cluster_B is None and cluster_ids is not None:
            changes["cluster_B"] = cluster_ids
        if ctx.records is None and need_records:
            changes["records"] = []
        return dataclasses.replace(ctx, **changes) if changes else ctx

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        output_routing: bool = False,
        routing_ctx: RoutingContext | None = None,
        cluster_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> MoELlavaCausalLMOutputWithPast:
        """LLaVA's forward inside a routing context.

        output_routing: return the per-layer ``RoutingRecord``s as ``routing_records``.
        routing_ctx: an externally built context (e.g. with a gradient observer); its records list, if any,
            receives this forward's records. Records are also collected in training so that ``aux_loss``
            is always there for the train step.
        cluster_ids: each sample's instruction cluster (B,), for routers that read it (MoCLE-style:
            ``RoutingContext.cluster_B``); the collator and the evaluation adapter add it.
        """
        seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        need_records = output_routing or self.training
        ctx = self._routing_ctx(seq_len, input_ids, attention_mask, routing_ctx, need_records, cluster_ids)
        first = len(ctx.records) if ctx.records is not None else 0
        with routing_context(self, ctx):
            out = super().forward(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                labels=labels,
                logits_to_keep=logits_to_keep,
                image_sizes=image_sizes,
                return_dict=True,
                **kwargs,
            )
        if self.training and any(getattr(m, "gradient_checkpointing", False) for m in self.modules()):
            # Activation checkpointing re-runs decoder layers inside backward, after this forward returned:
            # they must route with this forward's token mask and observer (a mismatch changes the kept
            # assignments, which checkpointing rejects), without appending records a second time. The
            # context stays attached until the next forward replaces it.
            replay = dataclasses.replace(ctx, records=None)
            for block in self.moe_blocks.values():
                block.routing_ctx = replay
        records = ctx.records[first:] if ctx.records is not None else None
        aux_loss = torch.stack([r.aux_loss for r in records]).sum() if records else None
        # every field LLaVA's output has in the installed transformers (5.24 renamed past_key_values and
        # image_hidden_states), plus the routing outputs
        return MoELlavaCausalLMOutputWithPast(
            **dict(out.items()), aux_loss=aux_loss, routing_records=records if output_routing else None
        )

    # ----------------------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_dense(
        cls,
        llava: LlavaForConditionalGeneration,
        moe_config: MoEConfig,
        routing_method: dict | None = None,
    ) -> MoELlavaForConditionalGeneration:
        """Sparse upcycling of a dense LLaVA: every expert of a MoE layer is a copy of that layer's dense FFN,
        every other tensor (parameters and buffers) is copied; routers keep nn.Linear's default init in fp32
        (as DeepSpeed's gate, which MoE-LLaVA adds to a loaded model). At initialisation the result computes
        the dense parent's function exactly: all experts are equal and the combine weights sum to 1."""
        config = MoELlavaConfig.from_llava_config(llava.config, moe_config, routing_method)
        with torch.device("meta"):  # every tensor is copied below: no need to initialise anything
            model = cls(config)
        dense_layers = llava.model.language_model.layers
        moe_layers = model.model.language_model.layers
        for i in config.moe_layers:
            moe_layers[i].mlp = _upcycle(dense_layers[i].mlp, model.config.moe_config, i)
        moe_prefixes = tuple(f"model.language_model.layers.{i}.mlp." for i in config.moe_layers)
        dense_tensors = {**dict(llava.named_parameters()), **dict(llava.named_buffers())}
        # Replace each meta tensor by a copy of the dense one (same dtype and device), keeping shared
        # (tied) parameters shared.
        new_by_id: dict[int, Tensor] = {}
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.startswith(moe_prefixes):
                continue
            if name not in dense_tensors:
                raise ValueError(f"from_dense: the dense model has no tensor {name!r}; is it a LLaVA model?")
            source = dense_tensors[name].detach().clone()
            new = (
                nn.Parameter(source, requires_grad=dense_tensors[name].requires_grad)
                if isinstance(tensor, nn.Parameter)
                else source
            )
            new_by_id[id(tensor)] = new
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for key, tensor in store.items():
                    if tensor is not None and id(tensor) in new_by_id:
                        store[key] = new_by_id[id(tensor)]
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        assert not leftover, f"from_dense left tensors uninitialised: {leftover[:10]}"
        model.generation_config = llava.generation_config
        model.train(llava.training)
        return model


def _upcycle(mlp: nn.Module, moe_cfg: MoEConfig, layer_idx: int) -> MoEBlock:
    """A MoE block built from the dense MLP (gate_proj/up_proj/down_proj or fc1/fc2 parameter layout)."""
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        for n in ("gate_proj", "up_proj", "down_proj"):
            if getattr(mlp, n).bias is not None:
                raise ValueError(f"layer {layer_idx}: {n} has a bias; the swiglu MoE expert has none.")
        return MoEBlock.upcycled(moe_cfg, mlp, "swiglu", layer_idx)
    if all(hasattr(mlp, n) for n in ("fc1", "fc2")):
        return MoEBlock.upcycled(moe_cfg, mlp, "gelu", layer_idx)
    raise ValueError(
        f"layer {layer_idx}: MLP {type(mlp).__name__} has neither gate_proj/up_proj/down_proj nor fc1/fc2; "
        "supported dense MLPs are Llama/Qwen2/StableLM-style and Phi-style."
    )


# --------------------------------------------------------------------------------------------------------
# builders


def build_llava_config(
    backbone: str,
    size: str,
    *,
    vocab_size: int | None,
    image_token_id: int,
    pad_token_id: int | None,
    **text_overrides: Any,
) -> LlavaConfig:
    """The dense LLaVA config of a registry backbone and size (``stgc.backbones``)."""
    text = text_config(backbone, size, vocab_size=vocab_size, pad_token_id=pad_token_id, **text_overrides)
    if not 0 <= image_token_id < text.vocab_size:
        raise ValueError(
            f"image_token_id={image_token_id} is outside the vocabulary (size {text.vocab_size}); "
            "add <image> to the tokenizer and pass its id and the tokenizer's length."
        )
    vision = vision_config(size)
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=num_image_tokens(vision),
        tie_word_embeddings=text.tie_word_embeddings,
        pad_token_id=pad_token_id,
        **LLAVA_WIRING,
    )


def build_model(
    backbone: str,
    size: str,
    *,
    vocab_size: int | None,
    image_token_id: int,
    pad_token_id: int | None,
    moe: MoEConfig,
    routing_method: dict | None = None,
    dtype: torch.dtype | None = None,
    **text_overrides: Any,
) -> MoELlavaForConditionalGeneration:
    """A freshly initialised MoE-LLaVA model of a registry backbone and size (no upcycling: use
    ``MoELlavaForConditionalGeneration.from_dense`` to start from a dense model)."""
    llava_cfg = build_llava_config(
        backbone,
        size,
        vocab_size=vocab_size,
        image_token_id=image_token_id,
        pad_token_id=pad_token_id,
        **text_overrides,
    )
    model = MoELlavaForConditionalGeneration(MoELlavaConfig.from_llava_config(llava_cfg, moe, routing_method))
    if dtype is not None:
        model = model.to(dtype)
        for block in model.moe_blocks.values():
            block.router.float()
    return model


def build_processor(
    tokenizer: PreTrainedTokenizerBase, image_size: int, patch_size: int, *, pad_to_square: bool = False
) -> LlavaProcessor:
    """A LLaVA processor for a CLIP tower of ``image_size`` / ``patch_size`` (CLIP's resize / crop /
    normalisation; the PIL image processor: torchvision is not a dependency).

    pad_to_square: pad each image to a square filled with the image mean before the resize (LLaVA's
        ``image_aspect_ratio="pad"``, MoE-LLaVA's ``expand2square``: transformers' LLaVA image processor does
        exactly this with ``do_pad``); saved in the processor config, so training, ``stgc eval``, lmms-eval
        and routing capture all process images the same way. Off: resize the shortest edge, centre crop.

    The processor expands each ``<image>`` into (image_size // patch_size)^2 tokens, the count the model's
    "default" feature strategy produces (CLS dropped: num_additional_image_tokens=1). Save it into the
    checkpoint folder with ``save_pretrained`` so that ``AutoProcessor.from_pretrained(path)`` works.
    """
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        raise ValueError(
            f"the tokenizer has no {IMAGE_TOKEN!r} token; add it (tokenizer.add_special_tokens("
            f"{{'additional_special_tokens': ['{IMAGE_TOKEN}']}})) before building the processor and model."
        )
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}.")
    return LlavaProcessor(
        image_processor=build_image_processor(image_size, pad_to_square=pad_to_square),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )


def build_image_processor(image_size: int, *, pad_to_square: bool = False) -> LlavaImageProcessorPil:
    """The image half of ``build_processor``: CLIP's resize (shortest edge), centre crop and normalisation
    to ``image_size``, padded to a square first when ``pad_to_square``."""
    return LlavaImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_convert_rgb=True,
        do_pad=pad_to_square,
    )


def save_random_checkpoint(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    backbone: str = "llama",
    size: str = "tiny",
    moe: MoEConfig | None = None,
    seed: int = 0,
) -> Path:
    """A randomly initialised checkpoint folder of a registry backbone and size (model + processor built on
    ``tokenizer``, which must hold ``<image>``): what tests and benchmarks evaluate when no trained model is
    needed. Loads with ``AutoModelForImageTextToText`` / ``AutoProcessor`` after ``import stgc``."""
    from stgc.backbones import vision_config

    torch.manual_seed(seed)
    model = build_model(
        backbone,
        size,
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        moe=moe or MoEConfig(),
    )
    vision = vision_config(size)
    path = Path(path)
    model.save_pretrained(str(path))
    build_processor(tokenizer, vision.image_size, vision.patch_size).save_pretrained(str(path))
    return path


def register() -> None:
    """Register the config and model with the Auto classes (idempotent; run on ``import stgc``)."""
    try:
        AutoConfig.register(MoELlavaConfig.model_type, MoELlavaConfig)
    except ValueError:  # already registered
        pass
    for auto in (AutoModelForImageTextToText,):
        try:
            auto.register(MoELlavaConfig, MoELlavaForConditionalGeneration)
        except ValueError:
            pass
    try:
        AutoProcessor.register(MoELlavaConfig, LlavaProcessor)
    except ValueError:
        pass


register()


__all__ = [
    "IMAGE_TOKEN",
    "MODALITY_IMAGE",
    "MODALITY_TEXT",
    "MoELlavaCausalLMOutputWithPast",
    "MoELlavaConfig",
    "MoELlavaForConditionalGeneration",
    "build_llava_config",
    "build_model",
    "build_processor",
    "json_form",
    "register",
    "save_random_checkpoint",
]
