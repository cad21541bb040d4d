"""What a checkpoint of this project is, checked before anything slow runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

MODEL_TYPE = "stgc_moe_llava"  # stgc.modeling.MoELlavaConfig.model_type


def check_checkpoint(path: str | os.PathLike) -> Path:
    """ValueError (naming the problem and the fix) unless `path` is a checkpoint folder of this project."""
    path = Path(path)
    if not path.exists():
        raise ValueError(
            f"checkpoint {str(path)!r} does not exist; pass a checkpoint folder "
            "(runs/<run>/checkpoint-<step>)"
        )
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        raise ValueError(
            f"{str(path)!r} is not a checkpoint folder (no config.json); pass the folder `stgc train` wrote "
            "(runs/<run>/checkpoint-<step>)"
        )
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{config} is not valid JSON ({err}); the checkpoint is damaged, re-save it"
        ) from None
    if model_type != MODEL_TYPE:
        raise ValueError(
            f"{str(path)!r} holds a {model_type!r} model, not {MODEL_TYPE!r}; convert it first "
            "(`stgc convert` for MoE-LLaVA checkpoints)"
        )
    if not _has_chat_template(path):
        raise ValueError(
            f"{str(path)!r} has no chat template (no chat_template.jinja, none in tokenizer_config.json), so "
            "no prompt can be rendered; convert the checkpoint again with `stgc convert` (it writes "
            "MoE-LLaVA's template) or save a tokenizer with a chat template into the folder"
        )
    return path


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    for name in ("tokenizer_config.json", "processor_config.json"):
        try:
            if json.loads((path / name).read_text()).get("chat_template"):
                return True
        except (OSError, json.JSONDecodeError):
            continue
    return False
