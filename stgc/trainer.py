"""The trainer: transformers' ``Trainer`` running a run's objectives (``stgc.objectives.set.ObjectiveSet``),
the trainable parameter groups, and the objectives' state in checkpoints (docs/architecture.md). The
trainer has no branch for any one method: what a method adds is in its objectives (docs/extending.md).

Loss scaling with gradient accumulation: the Trainer divides each micro-batch's loss by the number of
micro-batches of the step (``loss_is_scaled_for_ga = False`` below: the objectives' loss is a
per-micro-batch mean and ignores ``num_items_in_batch``). An observer that adds a gradient inside the
backward (STGC's fused mode) bypasses the loss, so the trainer gives it the same 1/accumulation factor
(``loss_scale``, in ``_observer``; two_pass's first pass uses it too); fused and two_pass then agree under
accumulation as without it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from stgc.callbacks import StepBuffer, routing_stats
from stgc.conflict import ConflictObserver
from stgc.data.sampling import ModalityGroupedSampling
from stgc.moe import ExpertBank, Router
from stgc.objectives.base import TrainingData
from stgc.objectives.set import STATE_NAME, ObjectiveSet


class NonFiniteLossError(RuntimeError):
    """The loss of a training step was NaN or infinite; the run stopped before applying it."""


class CheckpointError(ValueError):
    """A run folder or checkpoint cannot be resumed (corrupt, or written by a different run)."""


# --------------------------------------------------------------------------------------------------------
# trainable parameters


def parameter_groups(model: nn.Module) -> dict[str, str]:
    """Parameter name -> group (``stgc.recipes.PARAM_GROUPS`` or "other").

    MoE parameters are found by module type (``ExpertBank``, whose ``parameter_group`` names the group of
    each of its parameters: a LoRA bank's frozen dense FFN is "mlp"; ``Router``); the rest by the
    module path of transformers' LLaVA (``multi_modal_projector``, ``vision_tower``, ``embed_tokens``,
    ``lm_head``, ``self_attn``, ``mlp``) and norm modules by class name, so every backbone of the registry
    maps the same way without naming a model."""
    owner: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, Router):
            for p in module.parameters():
                owner[id(p)] = "router"
        if isinstance(module, ExpertBank):
            for p_name, p in module.named_parameters():
                owner[id(p)] = module.parameter_group(p_name)
    groups: dict[str, str] = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            parts = name.split(".")
            if id(p) in owner:
                group = owner[id(p)]
            elif "multi_modal_projector" in parts:
                group = "projector"
            elif "vision_tower" in parts:
                group = "vision"
            elif "embed_tokens" in parts:
                group = "embeddings"
            elif "lm_head" in parts:
                group = "lm_head"
            elif "self_attn" in parts:
                group = "attention"
            elif type(module).__name__.endswith("Norm"):
                group = "norms"
            elif "mlp" in parts:
                group = "mlp"
            else:
                group = "other"
            groups.setdefault(name, group)
    return groups


def set_trainable(model: nn.Module, trainable: str, groups: Sequence[str]) -> dict[str, int]:
    """Freeze every parameter except those of ``groups`` (all of them when ``trainable == "all"``).

    Returns trainable parameter counts per group. A requested group the model does not have is an error
    (e.g. "experts" on a dense model), not a silent no-op."""
    by_name = parameter_groups(model)
    present = set(by_name.values())
    missing = [g for g in groups if g not in present]
    if missing and trainable != "all":
        raise ValueError(
            f"training.trainable={trainable!r}: this model has no {missing} parameters (it has "
            f"{sorted(present)}); remove them from training.trainable."
        )
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        group = by_name[name]
        on = trainable == "all" or group in groups
        p.requires_grad_(on)
        if on:
            counts[group] = counts.get(group, 0) + p.numel()
    return counts


# --------------------------------------------------------------------------------------------------------
# the trainer


class MoETrainer(ModalityGroupedSampling, Trainer):
    """``Trainer`` whose loss is the run's objectives' (``ObjectiveSet.step_loss``), plus the metrics.

    objectives: the run's objectives; ``None`` trains a dense model with its own loss (stage 2).
    measure_conflict_every: on these steps a run whose objectives observe no token gradients (the
        baseline) gets a measuring ``ConflictObserver``, so that its conflict statistics are logged too.
    """

    loss_is_scaled_for_ga = False  # the objectives' loss is a micro-batch mean: let Trainer divide by GA

    def __init__(
        self,
        *args: Any,
        objectives: ObjectiveSet | None,
        measure_conflict_every: int,
        buffer: StepBuffer,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.objectives = objectives
        self.measure_conflict_every = measure_conflict_every
        self.buffer = buffer
        self.model_accepts_loss_kwargs = False
        self._step_loss = None
        self._tokens = 0
        self._fp16_loss_scaling = fp16_loss_scaling(self.args)

    def _observer(self, step: int):
        obs = self.objectives.observer(step)
        every = self.measure_conflict_every
        if obs is None and every and step % every == 0:
            obs = ConflictObserver(scale=0.0, reports_cel=False)  # measures only
        if obs is not None and hasattr(obs, "loss_scale"):
            # the loss is divided by the accumulation steps before its backward; fp16 loss scaling
            # multiplies it by a factor only the scaler knows
            ga = getattr(self, "current_gradient_accumulation_steps", 1)  # (set by the training loop)
            obs.loss_scale = None if self._fp16_loss_scaling else 1.0 / ga
        return obs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step = self.state.global_step
        mask = inputs.get("attention_mask")
        self._tokens = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        if self.objectives is None:
            out = model(**inputs)
            self._step_loss = out.loss
            loss = out.loss
        else:
            result = self.objectives.step_loss(model, inputs, step, observer=self._observer(step))
            self._step_loss = result
            out, loss = result.output, result.loss
        if not torch.isfinite(loss.detach()).all():
            logs = self._step_loss.logs() if self.objectives is not None else {"loss/lm": float(loss)}
            terms = ", ".join(f"{k}={v:.4g}" for k, v in logs.items() if k.startswith("loss/"))
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            raise NonFiniteLossError(
                f"non-finite loss at optimizer step {step + 1} ({terms}); the run stopped before applying "
                f"it. Last good checkpoint: {last or 'none yet'}. Lower training.lr or check the data, then "
                "resume (the run continues from that checkpoint)."
            )
        return (loss, out) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # after the backward: terms applied inside it (STGC fused) exist only now
        result, self._step_loss = self._step_loss, None
        if self.objectives is None:
            metrics = {"loss/total": float(result.detach()), "loss/lm": float(result.detach())}
        else:
            metrics = result.logs()
            metrics.update(routing_stats(result.records))
            metrics.update(self.objectives.metrics(result))
            # the Trainer's own ``loss`` log (the returned value, already divided by the accumulation
            # steps) gets those terms too, so that it agrees with metrics.jsonl's ``loss/total``
            extra = sum(result.coefficients.get(k, 0.0) * v for k, v in result.in_backward().items())
            if extra:
                loss = loss + extra / getattr(self, "current_gradient_accumulation_steps", 1)
        self.buffer.add(metrics, self._tokens)
        return loss


class ObjectivesCallback(TrainerCallback):
    """The objectives' preparation (once the number of steps is known), per-epoch hook (with the model and
    the training data: ``Objective.before_epoch``), per-step hook, and their state in every checkpoint
    (``objectives_state.pt``), restored when the run resumes from ``resume_from``."""

    def __init__(
        self,
        objectives: ObjectiveSet,
        moe_layers: tuple[int, ...],
        seed: int,
        resume_from: str | None,
        data: TrainingData | None = None,
    ):
        self.objectives, self.moe_layers, self.seed, self.resume_from = (
            objectives,
            moe_layers,
            seed,
            resume_from,
        )
        self.data = data

    def on_train_begin(self, args, state, control, **kwargs):
        self.objectives.prepare(max_steps=state.max_steps, moe_layers=self.moe_layers, seed=self.seed)
        if self.resume_from is not None:
            load_objectives_state(self.objectives, Path(self.resume_from))

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.data is not None:
            # state.epoch is the (fractional) progress: a resumed run continues inside its epoch
            self.objectives.before_epoch(int(math.floor((state.epoch or 0.0) + 1e-6)), self.data)

    def on_step_end(self, args, state, control, **kwargs):
        self.objectives.after_step(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        saved = self.objectives.state_dict()
        if saved and state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            torch.save(saved, folder / STATE_NAME)


def load_objectives_state(objectives: ObjectiveSet, checkpoint: Path) -> None:
    """Restore the objectives' state from a checkpoint being resumed; a run whose objectives keep state
    refuses a checkpoint without it."""
    path = checkpoint / STATE_NAME
    if not path.exists():
        if objectives.state_dict():
            raise CheckpointError(
                f"checkpoint {checkpoint} has no {STATE_NAME}, but this run's objectives {objectives.names} "
                "keep state across steps; resume from a checkpoint written with it, or start over."
            )
        return
    try:
        state = torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to read means a corrupt file
        raise CheckpointError(
            f"checkpoint {checkpoint}: {STATE_NAME} is unreadable ({error}); delete this checkpoint to "
            "resume from the previous one."
        ) from error
    objectives.load_state_dict(state)


def fp16_loss_scaling(args: TrainingArguments) -> bool:
    """Whether the run scales its loss for fp16 (torch amp or DeepSpeed's fp16 section)."""
    ds = args.deepspeed
    if isinstance(ds, str):
        ds = json.loads(Path(ds).read_text())
    return bool(args.fp16 or (isinstance(ds, dict) and (ds.get("fp16") or {}).get("enabled") is True))


def check_loss_scaling(args: TrainingArguments, objectives: ObjectiveSet | None) -> None:
    """fp16 loss scaling multiplies the loss, not a gradient an observer adds inside the backward (STGC's
    fused CEL gradient): refuse the pair."""
    if fp16_loss_scaling(args) and objectives is not None and objectives.adds_gradient_in_backward:
        raise ValueError(
            "fp16 with loss scaling cannot be combined with an objective that adds its gradient inside the "
            "backward, unscaled (STGC's fused mode); use bf16 (training.bf16=true) or "
            "method.stgc.mode=two_pass."
        )
