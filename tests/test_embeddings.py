"""Instruction embeddings through sentence-transformers: the bundled MiniLM is the offline default, a name
or folder (argument or STGC_EMBEDDING_MODEL) picks another model, and a loaded model is used as is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stgc import embeddings as E


def test_default_is_the_bundled_folder_and_any_folder_or_env_works(monkeypatch):
    monkeypatch.delenv("STGC_EMBEDDING_MODEL", raising=False)
    folder = Path(E.bundled_model_path())
    assert (folder / "modules.json").is_file() and E.model_source() == str(folder)
    texts = ["How many circles are there?", "What colour is the square?"]
    default = E.embed_instructions(texts)
    assert default.shape == (2, 384) and default.dtype == np.float32
    assert np.allclose(np.linalg.norm(default, axis=1), 1.0, atol=1e-5)
    by_folder = E.embed_instructions(texts, model=str(folder))  # a name or folder -> SentenceTransformer
    assert np.allclose(by_folder, default, atol=1e-5)
    monkeypatch.setenv("STGC_EMBEDDING_MODEL", "some-org/some-model")
    assert E.model_source() == "some-org/some-model" and E.model_source("x") == "x"


def test_a_loaded_model_is_used_as_is_and_bad_input_is_named():
    class Fixed:
        def encode(self, texts, **kwargs):
            assert kwargs["normalize_embeddings"] is True
            return np.ones((len(texts), 3))

    assert E.embed_instructions(["a", "b"], model=Fixed()).shape == (2, 3)
    with pytest.raises(ValueError, match="no instructions"):
        E.embed_instructions([], model=Fixed())
    with pytest.raises(ValueError, match="positions \\[1\\]"):
        E.embed_instructions(["ok", " "], model=Fixed())
