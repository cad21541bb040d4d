"""Instruction clusters: MiniLM embeddings + K-means (the model loads in ~6 s on 2 CPU cores)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.clusters import attach_labels, cluster_instructions, embed_instructions
from analysis.metrics import nmi
from tests.test_analysis_synthetic import make_traces

COUNTING = [
    "How many people are in the picture?",
    "Count the number of cars in the image.",
    "How many dogs can you see?",
    "What is the number of birds in this photo?",
    "How many chairs are there?",
]
COLOUR = [
    "What colour is the bus?",
    "What is the color of the woman's shirt?",
    "Which colour is the car on the left?",
    "What color are the flowers?",
    "Tell me the colour of the sky.",
]
OCR = [
    "What does the sign say?",
    "Read the text on the poster.",
    "What is written on the label of the bottle?",
    "Transcribe the words on the banner.",
    "What is the title written on the book cover?",
]
SUFFIX = " Answer with the option's letter from the given choices."
SCIENCE = [
    question + SUFFIX
    for question in [
        "Which type of rock forms when lava cools?",
        "Which property do these two objects have in common?",
        "Which animal's body is better adapted for cold climates?",
        "What is the probable cause of the change in the rock?",
        "Which solution has a higher concentration of particles?",
    ]
]


def test_clusters_group_similar_instructions():
    instructions = COUNTING + COLOUR + OCR + SCIENCE
    embeddings = embed_instructions(instructions)
    assert embeddings.shape == (20, 384) and embeddings.dtype == np.float32
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)

    clusters = cluster_instructions(instructions, 4, embeddings=embeddings)
    assert clusters["instruction"].tolist() == instructions
    groups = np.repeat(np.arange(4), 5)
    # each hand-made theme lands in one cluster and the themes in different clusters
    assert pd.crosstab(groups, clusters["cluster"]).gt(0).sum(axis=1).tolist() == [1, 1, 1, 1]
    assert clusters["cluster"].nunique() == 4

    again = cluster_instructions(instructions + COUNTING[:2], 4)  # embeds itself; duplicates share a cluster
    assert again["cluster"].iloc[:20].tolist() == clusters["cluster"].tolist()
    assert again["cluster"].iloc[20:].tolist() == clusters["cluster"].iloc[:2].tolist()


def test_cluster_arguments_checked():
    fake = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="num_clusters=4 .* distinct instructions \\(3\\)"):
        cluster_instructions(["a", "b", "c"], 4, embeddings=fake)
    with pytest.raises(ValueError, match="one row per instruction"):
        cluster_instructions(["a", "b", "c"], 2, embeddings=fake[:2])
    with pytest.raises(ValueError, match="empty"):
        embed_instructions(["ok", " "], model=object())


def test_attach_labels_then_nmi():
    traces = pd.concat([make_traces(task="a", routing="modality"), make_traces(task="b", routing="modality")])
    labels = pd.DataFrame(
        {"task": ["a", "a", "b", "b"], "sample_id": ["a-0", "a-1", "b-0", "b-1"], "cluster": [0, 1, 0, 1]}
    )
    joined = attach_labels(traces, labels)
    assert len(joined) == len(traces) and joined["cluster"].notna().all()
    assert np.allclose(nmi(joined, "cluster")["nmi"], 0.0, atol=1e-9)  # routing follows modality, not cluster
    with pytest.raises(ValueError, match="2 traced samples have no 'cluster'"):
        attach_labels(traces, labels.iloc[:2])
