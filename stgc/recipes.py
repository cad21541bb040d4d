"""Named experiments: Python functions returning a full, validated ``RunConfig`` (docs/architecture.md,
Conventions).

A run's config is four small dataclasses (model, data, training; the routing method's own config) plus the
output folder. Recipes build them; variants derive in code (``with_method``, ``stgc_variant``,
``with_seed``) and from the command line (``apply_overrides`` with ``section.key=value``), never by copying
a file. ``RunConfig.to_dict`` is what a run saves as ``run_config.json``; ``RunConfig.from_dict`` reads it.

Recipes
- ``tiny_dense``: the dense "stage 2" of the tiny model (every parameter trained from scratch). A randomly
  initialised tiny model trained only on experts / routers / projector (MoE-LLaVA's stage III) learns
  next to nothing, so the tiny recipe mirrors MoE-LLaVA: dense LLaVA first, then sparse upcycling.
- ``tiny``: stage III on the tiny model (CPU, minutes): upcycled from ``tiny_dense`` (trained first if
  missing, shared by every method and seed of a sweep), experts + routers + projector trained.
- ``small``: the same two stages at ~100M parameters on one GPU (``small_dense`` then ``small``).
- ``moe_llava_stablelm_1_6b``, ``moe_llava_qwen_1_8b``, ``moe_llava_phi2_2_7b``: MoE-LLaVA stage III at
  the published sizes and hyper-parameters (docs/method.md section 1), upcycled from a stage-2 LLaVA
  checkpoint folder given by ``model.init`` (not shipped: point it at your converted checkpoint).
Each ``<recipe>_stgc`` is ``stgc_variant(<recipe>())``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stgc.backbones import BACKBONES, get_backbone
from stgc.config import EXPERTS_CONFIGS, ROUTER_CONFIGS, ConfigBase, ExpertsConfig, MoEConfig, RouterConfig
from stgc.objectives.config import (
    METHODS,
    OBJECTIVE_CONFIGS,
    MethodConfig,
    ObjectiveConfig,
    STGCConfig,
    method_preset,
    with_objective,
)

PARAM_GROUPS = (
    "experts",
    "router",
    "projector",
    "vision",
    "embeddings",
    "attention",
    "mlp",
    "norms",
    "lm_head",
)
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
# training.report_to: loggers transformers' Trainer feeds besides metrics.jsonl (always written), and the
# package each needs
REPORT_TO = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
INIT_RECIPE_PREFIX = "recipe:"


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


# --------------------------------------------------------------------------------------------------------
# the config sections


@dataclasses.dataclass(frozen=True)
class ModelConfig(ConfigBase):
    """backbone, size: an entry of ``stgc.backbones`` (tiny / small / full).
    moe: the MoE layers (ignored by a dense run).
    dense: train a plain dense LLaVA (stage 2 of MoE-LLaVA; no routing, no method) instead of a MoE model.
    init: where the weights come from: ``scratch`` (random init), ``recipe:<name>`` (the final checkpoint of
        that recipe, trained first into ``<output_dir>/../<name>`` if missing), or a checkpoint folder. A
        dense checkpoint is upcycled (every expert a copy of the dense FFN); a MoE checkpoint is loaded.
    """

    backbone: str = "llama"
    size: str = "tiny"
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    dense: bool = False
    init: str = "scratch"

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig.from_dict(self.moe))
        backbone = get_backbone(self.backbone)  # raises with the valid names
        _check(
            self.size in backbone.sizes,
            f"model.size={self.size!r} is not defined for backbone {self.backbone!r}; valid sizes are "
            f"{sorted(backbone.sizes)}.",
        )
        _check(
            isinstance(self.init, str) and bool(self.init),
            f"model.init={self.init!r} is invalid; use 'scratch', 'recipe:<name>' or a checkpoint folder.",
        )
        if self.init.startswith(INIT_RECIPE_PREFIX):
            name = self.init[len(INIT_RECIPE_PREFIX) :]
            _check(
                name in RECIPES,
                f"model.init={self.init!r} names an unknown recipe; valid: {sorted(RECIPES)}.",
            )


@dataclasses.dataclass(frozen=True)
class DataConfig(ConfigBase):
    """train: a ``save_to_disk`` folder of LLaVA conversations (split "train"; ``stgc data`` writes one), or a
    LLaVA JSON file as LLaVA-mix-665K is distributed (``llava_v1_5_mix665k.json``; ``stgc.data.llava_json``).
    tokenizer: a tokenizer folder with an ``<image>`` token. max_length: tokens per sample after the image
    expansion (longer samples are truncated). max_samples: use the first N conversations (None: all).
    image_folder: the images of a LLaVA JSON file (None: the JSON file's folder).
    chat_template: a MoE-LLaVA conversation template (``stgc.data.chat_templates``, e.g. ``moellava_phi``)
        set on the tokenizer and saved with every checkpoint; None keeps the tokenizer's own.
    image_aspect_ratio: ``square`` (resize, centre crop) or ``pad`` (pad to a square with the image mean
        first, MoE-LLaVA's setting); saved in the checkpoint's processor.
    group_by_modality_length: LLaVA's sampler: batches of image rows or of text-only rows, similar lengths
        (``stgc.data.sampling``)."""

    train: str = "data/mini/train"
    tokenizer: str = "data/mini/tokenizer"
    max_length: int = 512
    max_samples: int | None = None
    image_folder: str | None = None
    chat_template: str | None = None
    image_aspect_ratio: str = "square"
    group_by_modality_length: bool = False

    def __post_init__(self) -> None:
        _check(
            isinstance(self.max_length, int) and self.max_length >= 8,
            f"data.max_length={self.max_length!r} is too small; use an integer >= 8 (MoE-LLaVA: 2048).",
        )
        _check(
            self.max_samples is None or self.max_samples >= 1,
            f"data.max_samples={self.max_samples!r} is invalid; use None (all) or a positive integer.",
        )
        from stgc.data.chat_templates import TEMPLATES

        _check(
            self.chat_template is None or self.chat_template in TEMPLATES,
            f"data.chat_template={self.chat_template!r} is unknown; use none (the tokenizer's own) or one of "
            f"{sorted(TEMPLATES)}.",
        )
        _check(
            self.image_aspect_ratio in ("square", "pad"),
            f"data.image_aspect_ratio={self.image_aspect_ratio!r} is invalid; use 'square' (resize and "
            "centre crop) or 'pad' (pad to a square with the image mean, MoE-LLaVA).",
        )


@dataclasses.dataclass(frozen=True)
class TrainingConfig(ConfigBase):
    """Optimisation and bookkeeping (MoE-LLaVA stage III defaults: lr 2e-5 cosine, warmup 0.03, no weight
    decay, 1 epoch, clip 1.0, bf16, global batch 128 = per-device batch x grad_accum x GPUs).

    max_steps: optimizer steps (> 0 overrides epochs). save_steps / logging_steps: in optimizer steps; the
    last step is always saved. measure_conflict_every: methods without token gradients (the baseline) get a
    measuring observer on these steps, so that baseline and STGC runs both log conflict curves (0: never).
    trainable: comma-separated parameter groups (``PARAM_GROUPS``) or ``all``; MoE-LLaVA stage III trains
    experts, routers and the projector. deepspeed: a DeepSpeed config file (``configs/deepspeed_zero2.json``)
    or None; the ``deepspeed`` launcher or ``--deepspeed`` selects it. cpu_threads: torch's intra-op
    threads while training (None: torch's default; restored afterwards).
    """

    lr: float = 2e-5
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    bf16: bool = False
    seed: int = 0
    save_steps: int = 500
    save_total_limit: int | None = None
    logging_steps: int = 10
    measure_conflict_every: int = 10
    trainable: str = "experts,router,projector"
    deepspeed: str | None = None
    gradient_checkpointing: bool = False
    dataloader_workers: int = 0
    cpu_threads: int | None = None
    report_to: str = "none"

    def __post_init__(self) -> None:
        self.report_targets(check_installed=False)  # validates the names
        _check(self.lr > 0, f"training.lr={self.lr} must be > 0 (MoE-LLaVA stage III: 2e-5).")
        _check(
            self.lr_scheduler in LR_SCHEDULERS,
            f"training.lr_scheduler={self.lr_scheduler!r} is not valid; choose one of {LR_SCHEDULERS}.",
        )
        _check(0 <= self.warmup_ratio < 1, f"training.warmup_ratio={self.warmup_ratio} must be in [0, 1).")
        _check(self.weight_decay >= 0, f"training.weight_decay={self.weight_decay} must be >= 0.")
        _check(self.epochs >= 0, f"training.epochs={self.epochs} must be >= 0 (max_steps > 0 overrides it).")
        _check(
            self.max_steps > 0 or self.epochs > 0,
            f"training.epochs={self.epochs} and max_steps={self.max_steps}: set epochs > 0 or max_steps > 0.",
        )
        for key in ("batch_size", "grad_accum", "save_steps", "logging_steps"):
            value = getattr(self, key)
            _check(
                isinstance(value, int) and value >= 1, f"training.{key}={value!r} must be an integer >= 1."
            )
        _check(
            self.measure_conflict_every >= 0,
            f"training.measure_conflict_every={self.measure_conflict_every} must be >= 0 (0: never).",
        )
        _check(self.max_grad_norm >= 0, f"training.max_grad_norm={self.max_grad_norm} must be >= 0 (0: off).")
        _check(
            self.save_total_limit is None or self.save_total_limit >= 1,
            f"training.save_total_limit={self.save_total_limit} must be None (keep all) or >= 1.",
        )
        _check(
            self.cpu_threads is None or self.cpu_threads >= 1,
            f"training.cpu_threads={self.cpu_threads} must be None (torch's default) or >= 1.",
        )
        self.trainable_groups()  # validates

    def report_targets(self, check_installed: bool = True) -> list[str]:
        """The Trainer's ``report_to`` list; ValueError for an unknown name or (check_installed) a logger
        whose package is missing, naming the pip install that fixes it."""
        import importlib.util

        names = [n.strip() for n in self.report_to.split(",") if n.strip()]
        if names == ["none"]:
            return []
        bad = [n for n in names if n not in REPORT_TO]
        _check(
            bool(names) and not bad,
            f"training.report_to={self.report_to!r} is not valid; use 'none' or a comma-separated subset of "
            f"{sorted(REPORT_TO)}.",
        )
        for name in names if check_installed else ():
            _check(
                any(importlib.util.find_spec(m) is not None for m in REPORT_TO[name]),
                f"training.report_to={self.report_to!r} needs the {name} package, which is not installed: "
                f"pip install {REPORT_TO[name][0]} (or set training.report_to=none).",
            )
        return names

    def trainable_groups(self) -> tuple[str, ...]:
        names = tuple(g.strip() for g in self.trainable.split(",") if g.strip())
        if names == ("all",):
            return PARAM_GROUPS
        bad = [g for g in names if g not in PARAM_GROUPS]
        _check(
            bool(names) and not bad,
            f"training.trainable={self.trainable!r} has unknown group(s) {bad or '(none given)'}; use a "
            f"comma-separated subset of {PARAM_GROUPS} or 'all'.",
        )
        return names


@dataclasses.dataclass(frozen=True)
class RunConfig(ConfigBase):
    """One training run. name: the recipe it came from (names the default output folder).
    output_dir: the run folder; None means ``runs/<name>-<method tag>-seed<seed>`` (``run_dir``)."""

    name: str = "custom"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    method: MethodConfig = dataclasses.field(default_factory=MethodConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    output_dir: str | None = None

    def __post_init__(self) -> None:
        for key, cls in (("model", ModelConfig), ("data", DataConfig), ("training", TrainingConfig)):
            value = getattr(self, key)
            if isinstance(value, dict):
                object.__setattr__(self, key, cls.from_dict(value))
        if isinstance(self.method, dict):
            object.__setattr__(self, "method", MethodConfig.from_dict(self.method))
        _check(isinstance(self.method, MethodConfig), f"method={self.method!r} is not a method config.")
        if self.model.dense:
            groups = set(self.training.trainable_groups())
            _check(
                not groups & {"experts", "router"} or self.training.trainable == "all",
                f"training.trainable={self.training.trainable!r} names MoE parameters, but model.dense=True "
                "has none; train e.g. 'all' or 'projector' in a dense run.",
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RunConfig:
        return super().from_dict(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @property
    def method_tag(self) -> str:
        """'dense', 'baseline', or the method name plus its objectives' non-default parameters (e.g.
        stgc-beta0.05)."""
        if self.model.dense:
            return "dense"
        return self.method.tag()

    @property
    def run_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return Path("runs") / f"{self.name}-{self.method_tag}-seed{self.training.seed}"

    def resolved(self) -> RunConfig:
        """The config with its output folder filled in (what a run saves)."""
        return self.replace(output_dir=str(self.run_dir))


# --------------------------------------------------------------------------------------------------------
# recipes


def tiny_dense() -> RunConfig:
    """Dense stage 2 of the tiny model, trained from scratch on the mini mixture (every parameter).

    lr 1e-3 (not MoE-LLaVA's 2e-5: these weights start random), warmup 3%, cosine, 4 epochs of the default
    4000 conversations at batch 16 (1000 steps; 90-180 s on 2 CPU cores, measured). One CPU thread: the
    tiny matrices gain nothing from more, and on a busy 2-core machine two threads wait on each other
    (measured: 0.11 s per step with 1 thread, 0.48 s with 2).
    """
    return RunConfig(
        name="tiny_dense",
        model=ModelConfig(backbone="llama", size="tiny", dense=True),
        data=DataConfig(max_length=192),
        training=TrainingConfig(
            lr=1e-3,
            epochs=4.0,
            batch_size=16,
            save_steps=250,
            logging_steps=50,
            measure_conflict_every=0,
            trainable="all",
            cpu_threads=1,
        ),
    )


def tiny() -> RunConfig:
    """Stage III of the tiny model: sparse upcycling of ``tiny_dense`` (4 experts, top-2, every other
    layer), experts + routers + projector trained for one epoch with MoE-LLaVA's recipe except the lr
    (2e-4: 10x MoE-LLaVA's, because the tiny run is 250 steps rather than ~5000). 25-40 s per run on 2 CPU
    cores (measured, baseline and STGC alike)."""
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
            cpu_threads=1,
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


# --------------------------------------------------------------------------------------------------------
# key=value overrides


def apply_overrides(config: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """``config`` with ``section.key=value`` overrides applied, e.g. ``training.lr=1e-4``,
    ``model.moe.num_experts=8``, ``output_dir=runs/x``, and for the method:

    - ``method.name=stgc``: the preset (its objectives with their defaults, and its MoE changes), applied
      before the other keys; with ``method.objectives`` given too, ``method.name`` is only the label;
    - ``method.objectives=load_balance,z_loss``: the objective list (objectives already in the method
      keep their settings; the label becomes the list's names after load_balance, joined by '+');
    - ``method.stgc.beta=0.05``: a setting of one objective; ``method.beta=0.05`` (the older form) sets it
      on the one objective that has such a setting;
    - ``model.moe.router.name=...`` / ``model.moe.experts.name=...``: a router or bank switch (its other
      settings reset to that one's defaults), applied before their other keys.

    Values convert to the field's type: numbers, ``true`` / ``false``, ``none`` / ``null`` for optional
    fields, comma-separated or ``[0,2]`` lists for tuples. An unknown key or a malformed value raises
    ValueError listing the valid keys; the result is validated like any config."""
    pairs = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (e.g. training.lr=1e-4).")
        pairs.append((key, value.strip()))
    given = dict(pairs)
    if "method.name" in given and "method.objectives" not in given:
        name = given["method.name"]
        if name not in METHODS:
            raise ValueError(f"method.name={name!r} is unknown; valid methods are {sorted(METHODS)}.")
        if name != config.method.name:
            config = with_method(config, name)
    data = config.to_dict()
    if "method.objectives" in given:
        data["method"] = _objective_list(data["method"], given["method.objectives"], given.get("method.name"))
    # registry switches first, so that the other keys are checked against the new class's fields
    for key in ("model.moe.router.name", "model.moe.experts.name"):
        if key in given:
            section = data["model"]["moe"][key.split(".")[2]]
            if given[key] != section.get("name"):
                section.clear()
                section["name"] = given[key]
    for key, value in pairs:
        if key in ("method.name", "method.objectives", "model.moe.router.name", "model.moe.experts.name"):
            continue
        if key.startswith("method."):
            _set_objective(data["method"], key, value)
        else:
            _set_path(data, key.split("."), value, RunConfig, key)
    return RunConfig.from_dict(data)


def _objective_list(method: dict[str, Any], text: str, label: str | None) -> dict[str, Any]:
    names = [n.strip() for n in text.strip("[]()").split(",") if n.strip()]
    unknown = [n for n in names if n not in OBJECTIVE_CONFIGS]
    if not names or unknown:
        raise ValueError(
            f"method.objectives={text!r} names unknown objectives {unknown or '(none given)'}; valid "
            f"objectives are {sorted(OBJECTIVE_CONFIGS)}."
        )
    old = {o["name"]: o for o in method["objectives"]}
    rest = [n for n in names if n != "load_balance"]
    return {
        "name": label or ("+".join(rest) if rest else "baseline"),
        "objectives": [old.get(n, {"name": n}) for n in names],
    }


def _set_objective(method: dict[str, Any], key: str, text: str) -> None:
    """``method.<objective>.<setting>=`` or ``method.<setting>=`` (the one objective that has it)."""
    path = key.split(".")[1:]
    objectives = method["objectives"]
    if len(path) == 2:
        target = next((o for o in objectives if o["name"] == path[0]), None)
        if target is None:
            raise ValueError(
                f"config key {key!r}: the method has no objective {path[0]!r} (it has "
                f"{[o['name'] for o in objectives]}); add it with method.objectives=..."
            )
        _set_path(target, path[1:], text, OBJECTIVE_CONFIGS[target["name"]], key)
        return
    owners = [o for o in objectives if path[0] in _field_hints(OBJECTIVE_CONFIGS[o["name"]], o)]
    if len(path) != 1 or len(owners) != 1 or path[0] == "name":
        valid = sorted(
            f"method.{o['name']}.{f}"
            for o in objectives
            for f in _field_hints(OBJECTIVE_CONFIGS[o["name"]], o)
            if f != "name"
        )
        raise ValueError(
            f"unknown config key {key!r}; the method {method['name']!r} has the objectives "
            f"{[o['name'] for o in objectives]}, whose keys are {valid} (and method.name, "
            "method.objectives)."
        )
    _set_path(owners[0], path, text, OBJECTIVE_CONFIGS[owners[0]["name"]], key)


def _field_hints(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    # registry sections: the class depends on the section's name
    if isinstance(cls, type) and issubclass(cls, RouterConfig):
        cls = ROUTER_CONFIGS.get(data.get("name"), cls)
    elif isinstance(cls, type) and issubclass(cls, ExpertsConfig):
        cls = EXPERTS_CONFIGS.get(data.get("name"), cls)
    elif isinstance(cls, type) and issubclass(cls, ObjectiveConfig):
        cls = OBJECTIVE_CONFIGS.get(data.get("name"), cls)
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _set_path(data: dict[str, Any], path: list[str], text: str, cls: type, full_key: str) -> None:
    hints = _field_hints(cls, data)
    head = path[0]
    if head not in hints or head == "method":
        prefix = full_key[: len(full_key) - len(".".join(path))]
        valid = sorted(prefix + k for k in hints)
        raise ValueError(f"unknown config key {full_key!r}; valid keys here are {valid}.")
    hint = hints[head]
    if len(path) > 1:
        sub = data.get(head)
        if not (isinstance(sub, dict) and dataclasses.is_dataclass(hint)):
            raise ValueError(f"config key {full_key!r}: {head!r} is a value, not a section.")
        _set_path(sub, path[1:], text, hint, full_key)
        return
    if dataclasses.is_dataclass(hint):
        keys = sorted(f"{full_key}.{f}" for f in _field_hints(hint, data.get(head) or {}))
        raise ValueError(f"config key {full_key!r} is a section; set one of its keys: {keys}.")
    data[head] = _convert(text, hint, full_key)


def _convert(text: str, hint: Any, key: str) -> Any:
    """``text`` as a value of type ``hint`` (int, float, bool, str, tuple[int, ...], X | None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if text.lower() in ("none", "null") and len(args) < len(typing.get_args(hint)):
            return None
        errors = []
        for arg in args:
            try:
                return _convert(text, arg, key)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError("; ".join(errors))
    if hint is bool:
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"{key}={text!r} is not a boolean; use true or false.")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{key}={text!r} is not an integer.") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{key}={text!r} is not a number.") from None
    if hint is str:
        return text
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        parts = [p.strip() for p in text.strip("[]()").split(",") if p.strip()]
        return tuple(_convert(p, item, key) for p in parts)
    raise ValueError(f"{key}: values of type {hint} cannot be set from the command line.")


__all__ = [
    "BACKBONES",
    "DataConfig",
    "ModelConfig",
    "PARAM_GROUPS",
    "RECIPES",
    "RunConfig",
    "TrainingConfig",
    "apply_overrides",
    "get_recipe",
    "stgc_variant",
    "with_method",
    "with_seed",
]
