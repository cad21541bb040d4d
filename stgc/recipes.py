"""Named experiments: Python functions returning a full, validated ``RunConfig`` (docs/architecture.md,
Conventions).

A run's config is four small dataclasses (model, data, training; the routing method's own config) plus the
output folder (``stgc.run_config``). Recipes build them; variants derive in code (``with_method``,
``stgc_variant``, ``with_seed``) and from the command line (``apply_overrides`` with ``section.key=value``,
``stgc.overrides``), never by copying a file. The config classes and ``apply_overrides`` are importable from
here too.

Recipes
- ``tiny_dense``: the dense "stage 2" of the tiny model: the language model and projector trained from
  scratch on a vision tower pretrained first (stage 0, ``stgc.vision_stage``) and kept frozen, as
  MoE-LLaVA keeps its CLIP frozen. A randomly initialised tiny model trained only on experts / routers /
  projector (MoE-LLaVA's stage III) learns next to nothing, so the tiny recipe mirrors MoE-LLaVA: dense
  LLaVA first, then sparse upcycling.
- ``tiny``: stage III on the tiny model (CPU, minutes): upcycled from ``tiny_dense`` (trained first if
  missing, shared by every method and seed of a sweep), experts + routers + projector trained.
- ``small``: the same two stages at ~100M parameters on one GPU (``small_dense`` then ``small``).
- ``moe_llava_stablelm_1_6b``, ``moe_llava_qwen_1_8b``, ``moe_llava_phi2_2_7b``: MoE-LLaVA stage III at
  the published sizes and hyper-parameters (docs/method.md section 1), upcycled from a stage-2 LLaVA
  checkpoint folder given by ``model.init`` (not shipped: point it at your converted checkpoint).
Each ``<recipe>_stgc`` is ``stgc_variant(<recipe>())``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stgc.backbones import BACKBONES
from stgc.config import MoEConfig
from stgc.objectives.config import METHODS, STGCConfig, method_preset, with_objective
from stgc.overrides import apply_overrides
from stgc.run_config import (
    INIT_RECIPE_PREFIX,
    LR_SCHEDULERS,
    PARAM_GROUPS,
    REPORT_TO,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainingConfig,
    _check,
)

# --------------------------------------------------------------------------------------------------------
# recipes


def tiny_dense() -> RunConfig:
    """Dense stage 2 of the tiny model on the mini mixture: the language model and projector from scratch,
    the vision tower from stage 0 (``model.vision_init=patch_pretrain``: pretrained per patch, ~70 s) and
    frozen. Trained through the language model from scratch, the tower and projector collapse to image
    tokens that differ by 3.7% across positions and the model never uses the image; frozen, the tokens keep
    their spread and VizWiz / VQAv2 answers depend on the image (results/tiny/experiments/README.md).

    lr 1e-3 (not MoE-LLaVA's 2e-5: these weights start random), warmup 3%, cosine, 6 epochs of the default
    4000 conversations at batch 16: 1500 steps, 0.086 s each on 2 CPU cores (129 s; the
    ``perf/step_time_s`` of a fresh-clone `make demo`). Two CPU threads: a sweep trains its runs one after
    another.
    """
    return RunConfig(
        name="tiny_dense",
        model=ModelConfig(backbone="llama", size="tiny", dense=True, vision_init="patch_pretrain"),
        data=DataConfig(max_length=192),
        training=TrainingConfig(
            lr=1e-3,
            epochs=6.0,
            batch_size=16,
            save_steps=500,
            logging_steps=50,
            measure_conflict_every=0,
            trainable="projector,embeddings,attention,mlp,norms,lm_head",
            cpu_threads=2,
        ),
    )


def tiny() -> RunConfig:
    """Stage III of the tiny model: sparse upcycling of ``tiny_dense`` (4 experts, top-2, every other
    layer), experts + routers + projector trained for one epoch with MoE-LLaVA's recipe except the lr
    (2e-4: 10x MoE-LLaVA's, because the tiny run is 250 steps rather than ~5000). 25-45 s per run on 2 CPU
    cores (measured, baseline and STGC alike), on two threads like ``tiny_dense``."""
    return RunConfig(
        name="tiny",
        model=ModelConfig(
            backbone="llama", size="tiny", moe=MoEConfig(), init=f"{INIT_RECIPE_PREFIX}tiny_dense"
        ),
        data=DataConfig(max_length=192),
        training=TrainingConfig(
            lr=2e-4,
            epochs=1.0,
            batch_size=16,
            save_steps=125,
            logging_steps=10,
            measure_conflict_every=5,
            cpu_threads=2,
        ),
    )


def small_dense() -> RunConfig:
    """Dense stage 2 of the ~100M-parameter model on one GPU (bf16), every parameter trained."""
    return RunConfig(
        name="small_dense",
        model=ModelConfig(backbone="llama", size="small", dense=True),
        data=DataConfig(max_length=512),
        training=TrainingConfig(
            lr=3e-4, epochs=4.0, batch_size=32, bf16=True, save_steps=500, logging_steps=20, trainable="all"
        ),
    )


def small() -> RunConfig:
    """Stage III of the small model on one GPU: upcycled from ``small_dense``, lr 1e-4, bf16."""
    return RunConfig(
        name="small",
        model=ModelConfig(backbone="llama", size="small", init=f"{INIT_RECIPE_PREFIX}small_dense"),
        data=DataConfig(max_length=512),
        training=TrainingConfig(
            lr=1e-4,
            epochs=1.0,
            batch_size=32,
            bf16=True,
            save_steps=250,
            logging_steps=10,
            measure_conflict_every=10,
        ),
    )


def _moe_llava(name: str, backbone: str, template: str) -> RunConfig:
    """MoE-LLaVA stage III (scripts/v1/*/finetune_moe.sh): 4 experts, top-2, every other layer, alpha 0.01,
    capacity factor 1.5 at training and 2.0 at evaluation (DeepSpeed's ``eval_capacity_factor``), lr 2e-5
    cosine, warmup 0.03, weight decay 0, 1 epoch, max length 2048, bf16, ZeRO-2, global batch 128 (8 GPUs
    x 4 x grad_accum 4), experts + routers + projector trained. ``model.init`` must point at a stage-2
    (dense) LLaVA checkpoint folder of this backbone; ``data`` at LLaVA-mix-665K as distributed (the JSON
    file, images in its folder or ``data.image_folder``) and the backbone's tokenizer with ``<image>``;
    MoE-LLaVA's conversation template of the backbone, images padded to a square, batches grouped by
    modality (its ``--version``, ``--image_aspect_ratio pad``, ``--group_by_modality_length True``).
    Set ``model.moe.capacity_factor=none model.moe.eval_capacity_factor=none`` for dropless routing
    throughout."""
    return RunConfig(
        name=name,
        model=ModelConfig(
            backbone=backbone,
            size="full",
            moe=MoEConfig(capacity_factor=1.5, eval_capacity_factor=2.0),
            init=f"checkpoints/{name}-stage2",
        ),
        data=DataConfig(
            train="data/llava_mix665k/llava_v1_5_mix665k.json",
            tokenizer=f"checkpoints/{name}-stage2",
            max_length=2048,
            chat_template=template,
            image_aspect_ratio="pad",
            group_by_modality_length=True,
        ),
        training=TrainingConfig(
            lr=2e-5,
            epochs=1.0,
            batch_size=4,
            grad_accum=4,
            bf16=True,
            save_steps=1000,
            save_total_limit=1,
            logging_steps=1,
            measure_conflict_every=50,
            deepspeed="configs/deepspeed_zero2.json",
            gradient_checkpointing=True,
            dataloader_workers=4,
        ),
    )


def moe_llava_stablelm_1_6b() -> RunConfig:
    """MoE-LLaVA-StableLM-2-1.6B stage III (4 experts, top-2), upcycled from a stage-2 checkpoint."""
    return _moe_llava("moe_llava_stablelm_1_6b", "stablelm", "moellava_stablelm")


def moe_llava_qwen_1_8b() -> RunConfig:
    """MoE-LLaVA-Qwen-1.8B stage III (4 experts, top-2), upcycled from a stage-2 checkpoint."""
    return _moe_llava("moe_llava_qwen_1_8b", "qwen2", "moellava_qwen")


def moe_llava_phi2_2_7b() -> RunConfig:
    """MoE-LLaVA-Phi-2-2.7B stage III (4 experts, top-2), upcycled from a stage-2 checkpoint."""
    return _moe_llava("moe_llava_phi2_2_7b", "phi", "moellava_phi")


# --------------------------------------------------------------------------------------------------------
# variants


def with_method(config: RunConfig, name: str, **params: Any) -> RunConfig:
    """``config`` trained with the method preset ``name`` (``stgc.objectives.config.METHODS``): its
    objectives, each parameter given to the objective that has it, the changes it makes to the MoE
    layers (a peer's router) and to training, and for a post-training stage (RoMA) the base recipe's
    final checkpoint as ``model.init``."""
    method = method_preset(name, **params)
    preset = METHODS[name]
    model, training = config.model, config.training
    if preset.moe:
        model = model.replace(moe=MoEConfig.from_dict({**model.moe.to_dict(), **preset.moe}))
    if preset.post_training:
        # a stage on the base recipe's trained MoE model (RoMA): its final checkpoint, trained if missing
        _check(
            config.name in RECIPES and not config.model.dense,
            f"method {name!r} post-trains a MoE checkpoint of recipe {config.name!r}, which is not a MoE "
            "recipe; start from a MoE recipe (e.g. tiny) or set model.init to a MoE checkpoint folder.",
        )
        model = model.replace(init=f"{INIT_RECIPE_PREFIX}{config.name}")
    if preset.training:
        training = training.replace(**preset.training)
    return config.replace(method=method, model=model, training=training)


def stgc_variant(config: RunConfig, **params: Any) -> RunConfig:
    """``config`` with STGC on top of its method (default beta 0.01, tau 0, fused) and any STGC parameter
    overridden: the baseline becomes ``stgc``, any other method ``<method>+stgc``."""
    stgc = STGCConfig(**params)
    method = with_objective(config.method, stgc, lambda n: "stgc" if n == "baseline" else f"{n}+stgc")
    return config.replace(method=method)


def with_seed(config: RunConfig, seed: int) -> RunConfig:
    return config.replace(training=config.training.replace(seed=seed))


RECIPES: dict[str, Callable[[], RunConfig]] = {
    "tiny_dense": tiny_dense,
    "tiny": tiny,
    "small_dense": small_dense,
    "small": small,
    "moe_llava_stablelm_1_6b": moe_llava_stablelm_1_6b,
    "moe_llava_qwen_1_8b": moe_llava_qwen_1_8b,
    "moe_llava_phi2_2_7b": moe_llava_phi2_2_7b,
}
# every method preset on every MoE recipe, alone and with STGC on top: tiny_stgc, small_z_loss,
# moe_llava_stablelm_1_6b_z_loss_stgc, ...
METHOD_BASES = ("tiny", "small", "moe_llava_stablelm_1_6b", "moe_llava_qwen_1_8b", "moe_llava_phi2_2_7b")


def _variant(base: Callable[[], RunConfig], method: str, stgc: bool) -> Callable[[], RunConfig]:
    def recipe() -> RunConfig:
        config = base() if method == "baseline" else with_method(base(), method)
        return stgc_variant(config) if stgc else config

    what = ("STGC on " if stgc else "") + f"{method}: {METHODS[method].doc}"
    recipe.__doc__ = f"{base.__name__} with {what}"
    return recipe


for _name in METHOD_BASES:
    RECIPES[f"{_name}_stgc"] = _variant(RECIPES[_name], "baseline", True)
    for _method in METHODS:
        if _method not in ("baseline", "stgc"):
            RECIPES[f"{_name}_{_method}"] = _variant(RECIPES[_name], _method, False)
            RECIPES[f"{_name}_{_method}_stgc"] = _variant(RECIPES[_name], _method, True)


def get_recipe(name: str) -> RunConfig:
    """The config of recipe ``name`` (ValueError listing the valid names)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid recipes are {sorted(RECIPES)}.")
    return RECIPES[name]()


__all__ = [
    "BACKBONES",
    "DataConfig",
    "LR_SCHEDULERS",
    "ModelConfig",
    "PARAM_GROUPS",
    "REPORT_TO",
    "RECIPES",
    "RunConfig",
    "TrainingConfig",
    "apply_overrides",
    "get_recipe",
    "stgc_variant",
    "with_method",
    "with_seed",
]
