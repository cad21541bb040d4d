"""The procedural mini benchmark suite (docs/benchmarks.md, "The mini suite"): ten benchmarks in the row
schema of the real lmms-eval datasets, a disjoint LLaVA-style training mixture, a small tokenizer, and the
training collator.

Importing this package is cheap; the names below load their modules (datasets, PIL, torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BENCHMARKS": "stgc.data.registry",
    "BenchmarkSpec": "stgc.data.registry",
    "check_schema": "stgc.data.registry",
    "check_row": "stgc.data.registry",
    "generate_suite": "stgc.data.suite",
    "load_benchmark": "stgc.data.suite",
    "load_train": "stgc.data.suite",
    "read_suite_info": "stgc.data.suite",
    "LlavaCollator": "stgc.data.collate",
    "make_contact_sheet": "stgc.data.contact_sheet",
    "scoring_check": "stgc.data.scoring_check",
    "doc_to_text": "stgc.data.prompts",
    "doc_to_target": "stgc.data.prompts",
    "CHAT_TEMPLATE": "stgc.data.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stgc.data' has no attribute {name!r}")
