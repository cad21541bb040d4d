"""The objective protocol (docs/extending.md): what one objective contributes to a training step.

An objective has loss terms (pure functions of the routing records, unscaled), a coefficient per term (a
schedule: a function of the step), optionally a gradient observer (token gradients in the backward), a
phase before the backward (terms that need a first look at the gradients: STGC's two_pass), a hook after
each optimizer step, diagnostics for ``metrics.jsonl``, and a ``state_dict`` saved with every checkpoint
and restored on resume. The coefficients are applied in one place, ``stgc.objectives.set.scaled_sum``
(an observer that adds its gradient inside the backward gets its scale from the same ``coefficients``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn

from stgc.config import MoEConfig
from stgc.moe.record import GradObserver, RoutingContext, RoutingRecord
from stgc.objectives.config import ObjectiveConfig


@dataclasses.dataclass
class StepInputs:
    """What a before-backward phase may use: the model, the forward's context and output, the main loss
    (L_lm plus every forward term, scaled), the step, its coefficients, ``rerun(ctx)``: the model's
    forward on the same inputs in another routing context, returning that forward's main loss, and
    ``inputs``: the batch itself (input_ids, attention_mask, labels, ...)."""

    model: nn.Module
    ctx: RoutingContext
    output: Any
    main_loss: Tensor
    step: int
    coefficients: dict[str, float]
    rerun: Callable[[RoutingContext], Tensor]
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TrainingData:
    """What a stage-level hook (``Objective.before_epoch``) may use: the model being trained, the
    training set (rows as the collator takes them) and the collator."""

    model: nn.Module
    dataset: Any
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None


class Objective:
    """Base class: subclasses set ``name`` (the key of its settings in ``OBJECTIVE_CONFIGS``) and override
    what they contribute. Every term returned by ``terms`` / ``before_backward`` needs a coefficient in
    ``coefficients`` (an error otherwise, never a silent 0)."""

    name: ClassVar[str] = ""
    # True when the observer adds a gradient outside the loss (fp16 loss scaling cannot scale it)
    adds_gradient_in_backward: ClassVar[bool] = False

    def __init__(self, config: ObjectiveConfig, moe: MoEConfig):
        self.config, self.moe = config, moe

    def prepare(self, *, max_steps: int, moe_layers: tuple[int, ...], seed: int) -> None:
        """Called once before training (and again on resume, before ``load_state_dict``)."""

    def check(self, moe_layers: tuple[int, ...]) -> None:
        """Refuse settings that do not fit the model (one clear ValueError)."""

    def before_epoch(self, epoch: int, data: TrainingData) -> None:
        """Called at the start of every epoch (the first one too, and the one a resumed run continues),
        after ``prepare`` and the restored state: work over the training set with the current model (RoMA
        finds its correctly answered samples and refreshes its cache here)."""

    def synthetic_setup(self, model: nn.Module, inputs: dict[str, Any]) -> None:
        """Stand-ins for what ``before_epoch`` computes from a real training set, built from one synthetic
        batch (random weights and token ids): what a step benchmark calls instead of ``before_epoch``."""

    def terms(self, records: list[RoutingRecord], step: int) -> dict[str, Tensor]:
        """Unscaled loss terms of this forward, each summed over the MoE layers."""
        return {}

    def coefficients(self, step: int) -> dict[str, float]:
        """The coefficient of each term at ``step``."""
        return {}

    def observer(self, step: int) -> GradObserver | None:
        """A gradient observer for this step's backward (``None``: no token gradients needed)."""
        return None

    def context(self, step: int) -> dict[str, Any]:
        """Extra ``RoutingContext`` fields for this step's forward (e.g. ``dense_layers``)."""
        return {}

    def before_backward(self, step_inputs: StepInputs, observer: GradObserver | None) -> dict[str, Tensor]:
        """Terms computed after the forward and before the backward (unscaled)."""
        return {}

    def metrics(self, records: list[RoutingRecord], observer: GradObserver | None) -> dict[str, float]:
        """Diagnostics of this micro-batch for ``metrics.jsonl`` (after the backward)."""
        return {}

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (``step`` is the number of steps done)."""

    def state_dict(self) -> dict[str, Any]:
        """State kept across steps (saved in every checkpoint, restored on resume); {} when stateless."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(
                f"objective {self.name!r} keeps no state, but a checkpoint holds {sorted(state)}."
            )


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: register an objective under ``cls.name`` (its settings class must be registered in
    ``stgc.objectives.config`` under the same name)."""
    if not cls.name or cls.name in OBJECTIVES:
        raise ValueError(f"objective name {cls.name!r} is empty or registered twice")
    OBJECTIVES[cls.name] = cls
    return cls
