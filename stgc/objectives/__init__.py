"""Objectives: what a run optimises besides the LM loss, as a list (docs/extending.md). Settings are in
``stgc.objectives.config`` (torch-free, so that configs and recipes read without torch); each objective's
implementation is a module here, registered by name; ``stgc.objectives.set.ObjectiveSet`` puts a run's
list together for the trainer. Names are imported from their modules on first use."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "OBJECTIVES": "stgc.objectives.set",
    "Objective": "stgc.objectives.base",
    "StepInputs": "stgc.objectives.base",
    "TrainingData": "stgc.objectives.base",
    "register_objective": "stgc.objectives.base",
    "ObjectiveSet": "stgc.objectives.set",
    "STATE_NAME": "stgc.objectives.set",
    "StepLoss": "stgc.objectives.set",
    "scaled_sum": "stgc.objectives.set",
    "METHODS": "stgc.objectives.config",
    "OBJECTIVE_CONFIGS": "stgc.objectives.config",
    "MethodConfig": "stgc.objectives.config",
    "MethodPreset": "stgc.objectives.config",
    "ObjectiveConfig": "stgc.objectives.config",
    "method_preset": "stgc.objectives.config",
    "register_method": "stgc.objectives.config",
    "register_objective_config": "stgc.objectives.config",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'stgc.objectives' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
