"""The run's config: four small frozen dataclasses (``ModelConfig``, ``DataConfig``, ``TrainingConfig``; the
routing method's own ``MethodConfig``) under one ``RunConfig``, with the output folder, each validated
when built (ValueError naming the key and the valid values).

``RunConfig.to_dict`` is what a run saves as ``run_config.json``; ``RunConfig.from_dict`` reads it. The
named experiments that build these are in ``stgc.recipes``; ``section.key=value`` overrides in
``stgc.overrides``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from stgc.backbones import get_backbone
from stgc.config import ConfigBase, MoEConfig
from stgc.objectives.config import MethodConfig

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
VISION_INITS = ("scratch", "patch_pretrain")
TEXT_INITS = ("scratch", "slot_pretrain")
PROJECTOR_INITS = ("scratch", "align")


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
    vision_init: where the vision tower of a model built from scratch comes from: ``scratch`` (random
        init), ``patch_pretrain`` (stage 0, ``stgc.vision_stage``: pretrained per patch on shape scenes into
        ``<output_dir>/../vision-<size>`` if missing; the tiny model's, which has no CLIP to start from),
        or a folder holding a CLIP vision model (``CLIPVisionModel.save_pretrained``) of the model's shape.
    text_init: where the language model of a dense model built from scratch comes from: ``scratch``,
        ``slot_pretrain`` (stage L, ``stgc.lm_stage``: the language model shipped in ``stgc/assets/<size>-lm``
        once one is; none ships yet), or the folder of a causal LM (``save_pretrained``, e.g. by
        ``stgc pretrain-lm``) of the model's architecture, with the run's tokenizer beside it.
    projector_init: ``scratch``, or ``align``: before training, the projector is fitted to hand the language
        model its stage-L image vectors (``stgc.lm_stage.align_projector``; needs both inits above).
    """

    backbone: str = "llama"
    size: str = "tiny"
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    dense: bool = False
    init: str = "scratch"
    vision_init: str = "scratch"
    text_init: str = "scratch"
    projector_init: str = "scratch"

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
        _check(
            isinstance(self.vision_init, str) and bool(self.vision_init),
            f"model.vision_init={self.vision_init!r} is invalid; use {' or '.join(VISION_INITS)} or the "
            "folder of a CLIP vision model (CLIPVisionModel.save_pretrained).",
        )
        _check(
            self.vision_init == "scratch" or self.init == "scratch",
            f"model.vision_init={self.vision_init!r} applies to a model built from scratch, but model.init="
            f"{self.init!r} loads every weight; set model.vision_init=scratch.",
        )
        _check(
            isinstance(self.text_init, str) and bool(self.text_init),
            f"model.text_init={self.text_init!r} is invalid; use {' or '.join(TEXT_INITS)} or the folder of "
            "a causal language model (save_pretrained) with its tokenizer.",
        )
        _check(
            self.text_init == "scratch" or (self.init == "scratch" and self.dense),
            f"model.text_init={self.text_init!r} applies to a dense model built from scratch, this one has "
            f"dense={self.dense}, init={self.init!r}; set model.text_init=scratch, or model.dense=true and "
            "model.init=scratch.",
        )
        _check(
            self.projector_init in PROJECTOR_INITS,
            f"model.projector_init={self.projector_init!r} is invalid; use {' or '.join(PROJECTOR_INITS)}.",
        )
        _check(
            self.projector_init == "scratch"
            or (self.text_init != "scratch" and self.vision_init != "scratch"),
            "model.projector_init=align fits the projector between a pretrained tower and a stage-L language "
            "model; set model.vision_init and model.text_init too (or model.projector_init=scratch).",
        )
        if self.init.startswith(INIT_RECIPE_PREFIX):
            name = self.init[len(INIT_RECIPE_PREFIX) :]
            from stgc.recipes import RECIPES  # the recipes build these configs

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
