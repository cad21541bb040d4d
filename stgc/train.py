"""Training a run (docs/architecture.md): the model and data of a config, and ``train``. The checks before
training (finished runs, compatible configs, readable checkpoints) are in ``stgc.run_checks``, the
Trainer's arguments in ``stgc.training_args`` (both importable from here too). The trainer itself
(``stgc.trainer.MoETrainer``) runs the run's objectives; everything else (checkpoints, resume, DeepSpeed,
gradient accumulation, clipping, the cosine schedule with warmup, seeds, the progress bar) is transformers'
``Trainer``'s own.

    train(get_recipe("tiny_stgc"))  -> runs/tiny-stgc-seed0/checkpoint-<last step>

Run folder (``RunConfig.run_dir``):
    run_config.json          the resolved config (also inside every checkpoint)
    metrics.jsonl            one line per optimizer step (``stgc.callbacks`` documents the keys)
    checkpoint-<step>/       a Hugging Face model folder (config, safetensors, processor, tokenizer) that
                             loads on its own with AutoModelForImageTextToText / AutoProcessor after
                             ``import stgc``, plus the Trainer's optimizer / scheduler / RNG state
                             and the objectives' state (``objectives_state.pt``, when they keep any)
    final.json               written when the run has finished: the final checkpoint's name
    .stgc.lock               the run's lock (``stgc.runlock``): one process (or launch) trains a run at a time

Checkpoints are written whole or not at all, and a resume first checks every file it will read
(``stgc.checkpoints``): a partial checkpoint is refused, naming what is missing and the ways out
(``resume_from`` an earlier complete checkpoint, or ``reset_optimizer``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint

from stgc.callbacks import (
    METRICS_NAME,
    RUN_CONFIG_NAME,
    MetricsCallback,
    NonFiniteGradientGuard,
    RunConfigCallback,
    StepBuffer,
)
from stgc.checkpoints import (
    FINAL_NAME,
    STAGING_NAME,
    CheckpointError,
    atomic_write_text,
    discard_staging,
    publish,
    resume_requirements,
)
from stgc.clusters import uses_instruction_clusters
from stgc.moe import MoEBlock
from stgc.objectives.base import TrainingData
from stgc.objectives.set import STATE_NAME, ObjectiveSet
from stgc.recipes import INIT_RECIPE_PREFIX, PARAM_GROUPS, RunConfig, get_recipe
from stgc.run_checks import (
    RESUMABLE_CHANGES,
    _resume_folder,
    check_checkpoint,
    check_run_folder,
    config_differences,
    finished_checkpoint,
)
from stgc.run_config import VISION_INITS
from stgc.runlock import folder_lock
from stgc.trainer import (
    MoETrainer,
    NonFiniteLossError,
    ObjectivesCallback,
    check_loss_scaling,
    fp16_loss_scaling,
    load_objectives_state,
    parameter_groups,
    set_trainable,
)
from stgc.training_args import DEFAULT_DEEPSPEED_CONFIG, training_arguments
from stgc.vision_stage import load_vision_tower, pretrain_vision

# --------------------------------------------------------------------------------------------------------
# building a run


@dataclasses.dataclass
class RunComponents:
    """What a run trains on: the model, the training set, its collator and the processor saved with each
    checkpoint (``None`` for toy models)."""

    model: nn.Module
    train_dataset: Any
    data_collator: Callable | None
    processing_class: Any = None


def build_components(config: RunConfig) -> RunComponents:
    """The model (scratch / upcycled / loaded per ``model.init``), the processor and the training data."""
    from datasets import load_from_disk
    from transformers import AutoConfig, AutoTokenizer, LlavaForConditionalGeneration

    from stgc.data.chat_templates import apply_template
    from stgc.data.collate import LlavaCollator
    from stgc.data.llava_json import is_llava_json, load_llava_json
    from stgc.data.suite import check_generated_suite
    from stgc.modeling import (
        MoELlavaConfig,
        MoELlavaForConditionalGeneration,
        build_llava_config,
        build_model,
        build_processor,
        json_form,
    )

    data = config.data
    for what, path in (("data.train", data.train), ("data.tokenizer", data.tokenizer)):
        if not Path(path).exists():
            raise ValueError(
                f"{what}={path!r} does not exist; generate the mini suite with `stgc data --out data/mini` "
                f"or point {what} at your data."
            )
    check_generated_suite(data.train)  # a suite of another generator version: refused before any work
    # the training rows first: a malformed row stops the run before any model is built
    if is_llava_json(data.train):
        dataset = load_llava_json(data.train, data.image_folder)
    else:
        dataset = load_from_disk(data.train)
        if hasattr(dataset, "keys"):  # a DatasetDict
            if "train" not in dataset:
                raise ValueError(f"data.train={data.train!r} has splits {list(dataset)}, no 'train'.")
            dataset = dataset["train"]
    if data.max_samples is not None:
        dataset = dataset.select(range(min(data.max_samples, len(dataset))))
    if not is_llava_json(data.train):  # (the JSON loader checks its rows itself)
        from stgc.data.validate import check_training_rows

        check_training_rows(dataset, f"data.train={data.train!r}")  # values, before a step trains on them
    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer)
    if data.chat_template is not None:
        apply_template(tokenizer, data.chat_template)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    mc = config.model
    routing_method = None if mc.dense else json_form(config.method.to_dict())
    init = _resolve_init(config)
    if init is None:
        kwargs = dict(
            vocab_size=len(tokenizer), image_token_id=image_token_id, pad_token_id=tokenizer.pad_token_id
        )
        if mc.dense:
            model = LlavaForConditionalGeneration(build_llava_config(mc.backbone, mc.size, **kwargs))
        else:
            model = build_model(mc.backbone, mc.size, moe=mc.moe, routing_method=routing_method, **kwargs)
        if mc.vision_init != "scratch":
            load_vision_tower(model, _resolve_vision_init(config))
        if mc.text_init != "scratch":
            _init_language_model(config, model, tokenizer)
    else:
        kind = AutoConfig.from_pretrained(init).model_type
        if kind == MoELlavaConfig.model_type:
            if mc.dense:
                raise ValueError(
                    f"model.init={str(init)!r} is a MoE checkpoint; a dense run needs a dense one."
                )
            model = MoELlavaForConditionalGeneration.from_pretrained(init)
            if model.config.moe_config != mc.moe:
                raise ValueError(
                    f"model.init={str(init)!r} has MoE settings {model.config.moe_config} but model.moe is "
                    f"{mc.moe}; make them equal (or start from a dense checkpoint to upcycle)."
                )
            model.config.routing_method = routing_method
        else:
            dense = LlavaForConditionalGeneration.from_pretrained(init)
            model = (
                dense
                if mc.dense
                else MoELlavaForConditionalGeneration.from_dense(dense, mc.moe, routing_method)
            )
    vision = model.config.vision_config
    processor = build_processor(
        tokenizer, vision.image_size, vision.patch_size, pad_to_square=data.image_aspect_ratio == "pad"
    )
    clusters = None
    if not mc.dense and uses_instruction_clusters(mc.moe):
        clusters = _instruction_clusters(config, model, dataset)
    collator = LlavaCollator(processor, max_length=data.max_length, clusters=clusters)
    return RunComponents(model, dataset, collator, processor)


def _instruction_clusters(config: RunConfig, model: nn.Module, dataset: Any):
    """The run's instruction clusters (MoCLE-style routers): those of a MoE checkpoint it continues from,
    else fitted on the training set once (cached beside the run folders), and attached to the model so
    that every checkpoint saves them (``stgc.clusters``)."""
    from stgc.clusters import clusters_for_training, first_instruction

    router = config.model.moe.router
    clusters = getattr(model, "instruction_clusters", None)
    if clusters is None:
        if hasattr(dataset, "select_columns"):  # a datasets.Dataset: no image decoding
            conversations = (row["conversations"] for row in dataset.select_columns(["conversations"]))
        else:  # LLaVA JSON rows (stgc.data.llava_json)
            conversations = (row["conversations"] for row in dataset.rows)
        instructions = [first_instruction(c) for c in conversations]
        cache = config.run_dir.parent / ".instruction_clusters"
        with _file_lock(config.run_dir.parent / ".instruction_clusters.lock"):
            clusters = clusters_for_training(instructions, router, cache)
    clusters.check(router.num_clusters)
    clusters.check_embedder()  # a cached or inherited cluster model must fit this run's embedding model
    model.instruction_clusters = clusters
    return clusters


def _resolve_vision_init(config: RunConfig) -> Path:
    """The CLIP vision folder ``model.vision_init`` names (running stage 0 first for ``patch_pretrain``)."""
    mc = config.model
    if mc.vision_init != "patch_pretrain":
        # checked here, where it is used, like model.init: a saved config stays loadable on other machines
        if not Path(mc.vision_init).is_dir():
            raise ValueError(
                f"model.vision_init={mc.vision_init!r} is neither {' nor '.join(VISION_INITS)} nor a folder; "
                "use one of those or the folder of a CLIP vision model (CLIPVisionModel.save_pretrained)."
            )
        return Path(mc.vision_init)
    out = config.run_dir.parent / f"vision-{mc.size}"
    with _file_lock(config.run_dir.parent / f".vision-{mc.size}.lock"):  # runs of a sweep share it
        return pretrain_vision(mc.size, out)


def _init_language_model(config: RunConfig, model: nn.Module, tokenizer: Any) -> None:
    """``model.text_init`` (stage L's language model or a folder) into the fresh model, then, with
    ``model.projector_init=align``, the projector fitted to it (``stgc.lm_stage``)."""
    from stgc.lm_stage import align_projector, load_language_model, packaged_language_model

    mc = config.model
    folder = packaged_language_model(mc.size) if mc.text_init == "slot_pretrain" else Path(mc.text_init)
    load_language_model(model, folder, tokenizer)
    if mc.projector_init == "align":
        accuracy = align_projector(model, tokenizer, seed=config.training.seed)
        print(f"[stgc.train] projector aligned to the language model of {folder}: held-out {accuracy}")


def _resolve_init(config: RunConfig) -> Path | None:
    """The checkpoint folder ``model.init`` names (training a ``recipe:`` parent first), or None."""
    init = config.model.init
    if init == "scratch":
        return None
    if init.startswith(INIT_RECIPE_PREFIX):
        name = init[len(INIT_RECIPE_PREFIX) :]
        parent = get_recipe(name)
        parent = parent.replace(output_dir=str(config.run_dir.parent / name), data=config.data)
        # several runs of a sweep may need the same parent: one trains it, the others wait and reuse it
        with _file_lock(config.run_dir.parent / f".{name}.lock"):
            return train(parent)
    path = Path(init)
    if not (path / "config.json").exists():
        raise ValueError(
            f"model.init={init!r} is not a checkpoint folder (no config.json); use 'scratch', "
            "'recipe:<name>' or a Hugging Face model folder."
        )
    return path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------------
# the entry point


def train(
    config: RunConfig,
    *,
    components: Callable[[RunConfig], RunComponents] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    deepspeed: str | dict | None = None,
    resume: bool = True,
    resume_from: str | os.PathLike | None = None,
    reset_optimizer: bool = False,
) -> Path:
    """Train ``config`` and return its final checkpoint folder.

    Idempotent: a finished run returns its final checkpoint without training; a partial run resumes from
    its latest checkpoint (same data order, optimizer, scheduler and RNG state: Trainer's
    ``resume_from_checkpoint``) once every file of it is verified; a run folder holding a different run,
    an incomplete or corrupt checkpoint or one that does not fit the model raises ``CheckpointError``.
    ``resume=False`` refuses to continue a partial run (an error, never a silent restart). The run folder
    is locked for the whole call (``stgc.runlock``: another process on it raises ``FolderLockedError``).
    components: builds model and data from the config (default ``build_components``; tests pass toys).
    deepspeed: a DeepSpeed config (path or dict) overriding ``training.deepspeed``.
    resume_from: a checkpoint of this run (name or path) to resume from instead of the latest.
    reset_optimizer: resume from the checkpoint's weights and step with a fresh optimizer (the schedule
        continues at the step); for a checkpoint whose optimizer / scheduler / RNG state is lost.
    """
    config = config.resolved()
    with folder_lock(config.run_dir, "run"):
        return _train_locked(
            config,
            components=components,
            callbacks=callbacks,
            deepspeed=deepspeed,
            resume=resume or resume_from is not None or reset_optimizer,
            resume_from=resume_from,
            reset_optimizer=reset_optimizer,
        )


def _train_locked(
    config: RunConfig,
    *,
    components: Callable[[RunConfig], RunComponents] | None,
    callbacks: Sequence[TrainerCallback],
    deepspeed: str | dict | None,
    resume: bool,
    resume_from: str | os.PathLike | None,
    reset_optimizer: bool,
) -> Path:
    run_dir = config.run_dir
    check_run_folder(config)
    done = finished_checkpoint(config)
    if done is not None:
        return done
    if int(os.environ.get("RANK", "0") or 0) == 0:
        discard_staging(run_dir)  # what a killed save left (never a published checkpoint)
    last = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    if resume_from is not None:
        last = str(_resume_folder(run_dir, resume_from))
    if last is not None and not resume:
        raise CheckpointError(
            f"{run_dir} holds a partial run (latest {Path(last).name}); pass resume=True (--resume) to "
            "continue it, or use another output_dir."
        )

    set_seed(config.training.seed)
    parts = (components or build_components)(config)
    model = parts.model
    objectives = None if config.model.dense else ObjectiveSet(config.method, config.model.moe)
    moe_layers = tuple(sorted(b.layer_idx for b in model.modules() if isinstance(b, MoEBlock)))
    if objectives is not None:
        if not moe_layers:
            raise ValueError("the model has no MoE blocks; set model.dense=True to train a dense model.")
        objectives.check(moe_layers)
        if hasattr(model.config, "routing_method"):
            from stgc.modeling import json_form

            model.config.routing_method = json_form(config.method.to_dict())
    groups = set_trainable(model, config.training.trainable, config.training.trainable_groups())

    args = training_arguments(config, **({"deepspeed": deepspeed} if deepspeed is not None else {}))
    check_loss_scaling(args, objectives)
    # files a resume must find besides the Trainer's: the objectives' state when they keep any (also
    # declared in every checkpoint's manifest, and checked again by ObjectivesCallback when it loads)
    keeps_state = objectives is not None and bool(objectives.state_dict())
    required_extra: tuple[str, ...] = (STATE_NAME,) if keeps_state else ()
    if last is not None:
        if reset_optimizer and args.deepspeed:
            raise CheckpointError(
                "--reset-optimizer is not supported under DeepSpeed (its engine loads the optimizer with the "
                "weights); resume from an earlier complete checkpoint with --resume-from."
            )
        required = resume_requirements(
            world_size=args.world_size, deepspeed=bool(args.deepspeed), fp16=args.fp16, extra=required_extra
        )
        check_checkpoint(
            Path(last), config, model, required=required, reset_optimizer=reset_optimizer,
            world_size=args.world_size,
        )  # fmt: skip
    if args.should_save:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / RUN_CONFIG_NAME, config.to_json())
    buffer = StepBuffer()
    method_name = "dense" if objectives is None else config.method_tag
    hooks = (
        []
        if objectives is None
        else [
            ObjectivesCallback(
                objectives,
                moe_layers,
                config.training.seed,
                last,
                TrainingData(model, parts.train_dataset, parts.data_collator),
            )
        ]
    )
    trainer = MoETrainer(
        model=model,
        args=args,
        train_dataset=parts.train_dataset,
        data_collator=parts.data_collator,
        processing_class=parts.processing_class,
        objectives=objectives,
        measure_conflict_every=config.training.measure_conflict_every,
        buffer=buffer,
        callbacks=[
            MetricsCallback(run_dir / METRICS_NAME, buffer, method_name),
            RunConfigCallback(config.to_json()),
            NonFiniteGradientGuard(NonFiniteLossError),
            *hooks,
            *callbacks,
        ],
    )
    trainer.checkpoint_required = required_extra
    trainer.reset_optimizer = reset_optimizer and last is not None
    if args.should_save:
        total = sum(groups.values())
        print(f"[stgc.train] {run_dir}: training {total:,} parameters ({groups}); resume from {last}")
        if trainer.reset_optimizer:
            print(f"[stgc.train] --reset-optimizer: {Path(last).name}'s weights and step, a fresh optimizer")
    threads = torch.get_num_threads()
    if config.training.cpu_threads is not None:
        torch.set_num_threads(config.training.cpu_threads)
    try:
        trainer.train(resume_from_checkpoint=last)
    finally:
        torch.set_num_threads(threads)
    state = trainer.state
    if state.global_step < state.max_steps:
        return Path(get_last_checkpoint(str(run_dir)))  # stopped early by a callback: not finished
    final = run_dir / f"checkpoint-{state.global_step}"
    if args.should_save:
        if not final.is_dir():  # save_strategy "steps" saves the last step; keep the guarantee explicit
            staged = run_dir / STAGING_NAME / final.name
            trainer.save_model(str(staged))
            (staged / RUN_CONFIG_NAME).write_text(config.to_json())
            publish(staged, final)
        atomic_write_text(
            run_dir / FINAL_NAME,
            json.dumps({"checkpoint": final.name, "global_step": state.global_step}, indent=2) + "\n",
        )
    if args.world_size > 1:
        torch.distributed.barrier()
    return final


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (NaN where a value was not finite)."""
    path = Path(run_dir) / METRICS_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = [
    "CheckpointError",
    "DEFAULT_DEEPSPEED_CONFIG",
    "MoETrainer",
    "NonFiniteLossError",
    "ObjectivesCallback",
    "PARAM_GROUPS",
    "RESUMABLE_CHANGES",
    "RunComponents",
    "build_components",
    "check_checkpoint",
    "check_run_folder",
    "config_differences",
    "finished_checkpoint",
    "fp16_loss_scaling",
    "load_objectives_state",
    "parameter_groups",
    "read_metrics",
    "set_trainable",
    "train",
    "training_arguments",
]
