"""Instruction clusters for MoCLE-style routing (docs/peers_routing.md): the fitted K-means model that gives
each sample its cluster id, in training (the collator) and in evaluation (the lmms-eval adapter, the
routing capture), saved with every checkpoint of the run.

A sample's instruction is its first human turn with ``<image>`` removed (``first_instruction``; at
evaluation the task's prompt text, ``instruction_text``). Instructions are embedded with
``stgc.embeddings`` (a sentence-transformers model, the bundled all-MiniLM-L6-v2 by default: 384-d,
unit norm) and clustered by scikit-learn's K-means (k-means++, n_init=10, a fixed random_state), each
distinct instruction one point, once per training set. The fitted model is the centroids plus the name
of the embedding model: ``instruction_clusters.json`` (plain JSON, no pickle) next to the model weights in
every checkpoint folder, loadable on its own with ``InstructionClusters.load(folder)``. A sample's cluster is
its embedding's nearest centroid (Euclidean, as K-means assigns; ties to the lower id), so the same
instruction gets the same id in training and every evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CLUSTERS_NAME = "instruction_clusters.json"
FORMAT = "stgc-instruction-clusters"
IMAGE_PLACEHOLDER = "<image>"


def fit_kmeans(points: np.ndarray, num_clusters: int, seed: int) -> Any:
    """The project's one K-means (scikit-learn, k-means++ initialisation, n_init 10, fixed seed): the
    routers' instruction clusters and the analysis's cluster labels fit alike."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=num_clusters, n_init=10, random_state=seed).fit(points)


def instruction_text(text: str) -> str:
    """An instruction as clustered: ``<image>`` removed, surrounding whitespace stripped."""
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


def first_instruction(conversations: Sequence[Mapping[str, str]]) -> str:
    """The first human turn of a LLaVA conversation (``[{"from": "human"|"gpt", "value": ...}]``), as
    clustered."""
    for turn in conversations:
        if turn.get("from") == "human":
            return instruction_text(turn["value"])
    raise ValueError("the conversation has no human turn; every training row needs an instruction")


def uses_instruction_clusters(moe: Any) -> bool:
    """Whether a model with these MoE settings routes on instruction clusters (its router settings say
    so: ``uses_instruction_clusters``)."""
    return bool(getattr(moe.router, "uses_instruction_clusters", False))


@dataclasses.dataclass
class InstructionClusters:
    """A fitted instruction-cluster model: ``centroids`` (k, dim) and the embedding model that maps an
    instruction into their space (a sentence-transformers name or folder; ``None``: ``stgc.embeddings``'
    default). ``fitted_on``: provenance (instruction counts, fingerprint). ``predict`` remembers the ids of
    the instructions it has seen (the training set's after ``fit``)."""

    centroids: np.ndarray
    embedding_model: str | None = None
    fitted_on: dict[str, Any] = dataclasses.field(default_factory=dict)
    _known: dict[str, int] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.centroids = np.asarray(self.centroids, dtype=np.float32)
        if self.centroids.ndim != 2 or len(self.centroids) < 1:
            raise ValueError(f"centroids have shape {self.centroids.shape}; expected (k, dim) with k >= 1")

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    # ---------------------------------------------------------------------------------------- fitting
    @classmethod
    def fit(
        cls,
        instructions: Sequence[str],
        num_clusters: int,
        *,
        embedding_model: str | None = None,
        seed: int = 0,
        model: Any = None,
    ) -> InstructionClusters:
        """K-means over the distinct instructions' embeddings (module docstring). ``model``: an already
        loaded embedder (anything with sentence-transformers' ``encode``; tests pass a small one) used
        instead of loading ``embedding_model``."""
        distinct = list(dict.fromkeys(instruction_text(t) for t in instructions))
        if not 1 <= num_clusters <= len(distinct):
            raise ValueError(
                f"num_clusters={num_clusters} needs at least that many distinct instructions; the training "
                f"set has {len(distinct)}. Lower model.moe.router.num_clusters (e.g. to "
                f"{max(2, len(distinct) // 4)}) or train on more data."
            )
        X = _embed(distinct, embedding_model, model)
        kmeans = fit_kmeans(X, num_clusters, seed)
        fitted = cls(
            kmeans.cluster_centers_,
            embedding_model=embedding_model,
            fitted_on={
                "instructions": len(list(instructions)),
                "distinct": len(distinct),
                "fingerprint": fingerprint(distinct, num_clusters, embedding_model, seed),
                "seed": seed,
            },
        )
        fitted._remember(distinct, fitted._nearest(X))
        return fitted

    # ------------------------------------------------------------------------------------- prediction
    def predict(self, instructions: Sequence[str], *, model: Any = None) -> np.ndarray:
        """Cluster id (int64) of each instruction: its embedding's nearest centroid."""
        texts = [instruction_text(t) for t in instructions]
        unseen = [t for t in dict.fromkeys(texts) if t not in self._known]
        if unseen:
            self._remember(unseen, self._nearest(_embed(unseen, self.embedding_model, model)))
        return np.asarray([self._known[t] for t in texts], dtype=np.int64)

    def _nearest(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.dim:
            fitted_with = self.embedding_model or "the default"
            raise ValueError(
                f"the instruction embeddings have dimension {X.shape[-1]} but this cluster model's centroids "
                f"have {self.dim} (it was fitted with embedding model {fitted_with!r}); "
                "embed with the model the clusters were fitted with (STGC_EMBEDDING_MODEL, "
                "model.moe.router.embedding_model) or refit the clusters."
            )
        C = self.centroids.astype(np.float64)
        d2 = (X * X).sum(1)[:, None] - 2 * X @ C.T + (C * C).sum(1)[None, :]
        return d2.argmin(1).astype(np.int64)

    def _remember(self, texts: Sequence[str], ids: np.ndarray) -> None:
        self._known.update(zip(texts, (int(i) for i in ids), strict=True))

    def check_embedder(self, *, model: Any = None) -> None:
        """Refuse an embedding model whose dimension is not the centroids' (one probe sentence)."""
        self._nearest(_embed(["What is in the image?"], self.embedding_model, model))

    def check(self, num_clusters: int) -> None:
        """Refuse a cluster model whose k is not the router's."""
        if self.num_clusters != num_clusters:
            raise ValueError(
                f"the instruction-cluster model has {self.num_clusters} clusters but the router expects "
                f"num_clusters={num_clusters}; refit the clusters with k={num_clusters} or set "
                f"model.moe.router.num_clusters={self.num_clusters}."
            )

    # --------------------------------------------------------------------------------------- storage
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": 1,
            "num_clusters": self.num_clusters,
            "dim": self.dim,
            "embedding_model": self.embedding_model,
            "fitted_on": self.fitted_on,
            "centroids": self.centroids.tolist(),
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``instruction_clusters.json`` into ``folder`` (atomically)."""
        path = Path(folder) / CLUSTERS_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict()) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> InstructionClusters:
        """Read a cluster model from a checkpoint folder or the JSON file itself."""
        path = Path(path)
        if path.is_dir():
            path = path / CLUSTERS_NAME
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a readable instruction-cluster model ({error}).") from error
        if data.get("format") != FORMAT:
            raise ValueError(f"{path} is not an instruction-cluster model (format {data.get('format')!r}).")
        clusters = cls(data["centroids"], data.get("embedding_model"), data.get("fitted_on", {}))
        if clusters.dim != data.get("dim", clusters.dim):
            raise ValueError(
                f"{path}: its centroids have dimension {clusters.dim}, its header says {data['dim']}"
            )
        return clusters

    @classmethod
    def load_if_present(cls, folder: str | os.PathLike) -> InstructionClusters | None:
        path = Path(folder) / CLUSTERS_NAME
        return cls.load(path) if path.is_file() else None


def check_checkpoint_clusters(folder: str | os.PathLike) -> InstructionClusters | None:
    """For a checkpoint whose router reads instruction clusters: its cluster model, checked against the
    router (k) and the embedding model (dimension); ``None`` for other checkpoints. ValueError (with the
    fix) when the file is missing or does not fit."""
    from stgc.config import MoEConfig

    config_path = Path(folder) / "config.json"
    try:
        moe = MoEConfig.from_dict(json.loads(config_path.read_text()).get("moe"))
    except (OSError, json.JSONDecodeError):
        return None  # not a MoE checkpoint of this project: the checkpoint checks say so
    if not uses_instruction_clusters(moe):
        return None
    clusters = InstructionClusters.load_if_present(folder)
    if clusters is None:
        raise ValueError(
            f"{folder} routes on instruction clusters (router {moe.router.name!r}) but has no "
            f"{CLUSTERS_NAME}; copy it from the run's training checkpoint (every checkpoint holds it)."
        )
    clusters.check(moe.router.num_clusters)
    clusters.check_embedder()
    return clusters


def fingerprint(distinct: Sequence[str], num_clusters: int, embedding_model: str | None, seed: int) -> str:
    """What determines a fit: the distinct instructions, k, the embedding model and the seed."""
    h = hashlib.sha256()
    h.update(json.dumps([num_clusters, embedding_model, seed]).encode())
    for text in sorted(distinct):
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _embed(texts: list[str], embedding_model: str | None, model: Any) -> np.ndarray:
    from stgc.embeddings import embed_instructions

    return embed_instructions(texts, model=model if model is not None else embedding_model)


def clusters_for_training(
    instructions: Sequence[str], router: Any, cache_dir: str | os.PathLike | None
) -> InstructionClusters:
    """The run's cluster model: fitted once per training set (k, embedding model and seed from the router
    settings) and cached in ``cache_dir`` under its fingerprint, so that every method and seed of a sweep
    on the same data shares one fit."""
    distinct = list(dict.fromkeys(instruction_text(t) for t in instructions))
    key = fingerprint(distinct, router.num_clusters, router.embedding_model, router.cluster_seed)
    cached = None if cache_dir is None else Path(cache_dir) / key
    if cached is not None and (cached / CLUSTERS_NAME).is_file():
        clusters = InstructionClusters.load(cached)
    else:
        clusters = InstructionClusters.fit(
            instructions,
            router.num_clusters,
            embedding_model=router.embedding_model,
            seed=router.cluster_seed,
        )
        if cached is not None:
            clusters.save(cached)
    clusters.check(router.num_clusters)
    return clusters
