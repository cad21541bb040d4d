"""The transformers ``TrainingArguments`` of a run config (``training_arguments``): the run's optimisation
settings, DeepSpeed when ``training.deepspeed`` names a config (``DEFAULT_DEEPSPEED_CONFIG``), and the
switches whose names differ between transformers 5.x versions."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from stgc.run_config import RunConfig

DEFAULT_DEEPSPEED_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "deepspeed_zero2.json"


def training_arguments(config: RunConfig, **extra: Any) -> TrainingArguments:
    """The ``TrainingArguments`` of a run config (DeepSpeed when ``training.deepspeed`` names a config)."""
    t = config.training
    deepspeed = extra.pop("deepspeed", t.deepspeed)
    if isinstance(deepspeed, str) and not Path(deepspeed).exists():
        # a relative path names a file of the working directory or else of this repository (configs/...)
        in_repo = DEFAULT_DEEPSPEED_CONFIG.parents[1] / deepspeed
        if Path(deepspeed).is_absolute() or not in_repo.exists():
            raise ValueError(
                f"training.deepspeed={deepspeed!r} does not exist; use e.g. {DEFAULT_DEEPSPEED_CONFIG}."
            )
        deepspeed = str(in_repo)
    kwargs: dict[str, Any] = dict(
        output_dir=str(config.run_dir),
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        max_grad_norm=t.max_grad_norm,
        bf16=t.bf16,
        seed=t.seed,
        data_seed=t.seed,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        report_to=t.report_targets() or "none",  # metrics.jsonl is always written (MetricsCallback)
        remove_unused_columns=False,  # the collator needs the raw image and conversations
        dataloader_num_workers=t.dataloader_workers,
        # non-reentrant: the backward keeps the original autograd nodes (and the MoE block's gradient
        # observer on them); the reentrant form would recompute outside the routing context
        **_checkpointing_args(t.gradient_checkpointing),
        **_length_grouping_args(config.data.group_by_modality_length),
        dataloader_pin_memory=torch.cuda.is_available(),
        deepspeed=deepspeed,
        disable_tqdm=False,
    )
    kwargs.update(extra)
    return TrainingArguments(**kwargs)


def _length_grouping_args(enabled: bool) -> dict[str, Any]:
    """transformers' length-grouping switch (``train_sampling_strategy`` in 5.24, ``group_by_length``
    before); ``ModalityGroupedSampling`` then groups by modality too (``data.group_by_modality_length``)."""
    if not enabled:
        return {}
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def _checkpointing_args(enabled: bool) -> dict[str, Any]:
    """transformers renamed ``gradient_checkpointing`` to ``activation_checkpointing`` within 5.x (5.17 has
    the old name, 5.23 the new one): use whichever this version's TrainingArguments has."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: enabled, f"{key}_kwargs": {"use_reentrant": False} if enabled else None}
