"""stgc: MoE-LLaVA training with STGC and peer routing methods.

``import stgc`` is cheap (no torch, no transformers) and registers the model with transformers' Auto
classes as soon as transformers is imported (``stgc._autoregister``), so that
``AutoModelForImageTextToText.from_pretrained(path)`` loads a checkpoint folder after ``import stgc``.
Submodules load on first use (``stgc.modeling``, ``stgc.recipes``, ...).
"""

from __future__ import annotations

import importlib
from typing import Any

from stgc import _autoregister

_autoregister.install()


def __getattr__(name: str) -> Any:
    """``stgc.<submodule>`` without importing it first (``import stgc; stgc.modeling...``)."""
    if name.startswith("_"):
        raise AttributeError(f"module 'stgc' has no attribute {name!r}")
    try:
        return importlib.import_module(f"stgc.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"stgc.{name}":
            raise
        raise AttributeError(f"module 'stgc' has no attribute {name!r}") from None
