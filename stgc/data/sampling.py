"""LLaVA's ``group_by_modality_length`` (MoE-LLaVA's stage III sets it): batches hold image rows only or
text-only rows only, and rows of similar length.

transformers' Trainer has length grouping (``train_sampling_strategy="group_by_length"``,
``get_length_grouped_indices``: random mega-batches sorted by length, the longest batch first) but no
modality split. ``modality_grouped_indices`` applies transformers' grouping to each modality separately, cuts
each into blocks of one global step (per-device batch x processes x accumulation steps, as LLaVA's
``LengthGroupedSampler`` does), shuffles the full blocks of both modalities together and puts the two
remainders, mixed, last. Every per-device micro-batch inside a block is one modality, since accelerate hands
consecutive per-device batches to the processes in turn.

``ModalityGroupedSampling`` is the Trainer mixin that uses it when the run asks for length grouping
(``data.group_by_modality_length`` sets transformers' own switch) and the training set has modality lengths
(``modality_lengths``): LLaVA JSON rows (``stgc.data.llava_json``) or a ``datasets`` folder of
conversations. The order is a function of the seed and the epoch only, so a resumed run skips exactly the
batches it had trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices


def modality_lengths(dataset: Any) -> list[int] | None:
    """Per row: whitespace words of its conversation, negative for a row without image (LLaVA's lengths);
    None when the dataset has no such rows. Reads no image."""
    lengths = getattr(dataset, "modality_lengths", None)
    if lengths is not None:
        return list(lengths)
    column_names = getattr(dataset, "column_names", None)
    if column_names is None or "conversations" not in column_names:
        return None
    has_image = (
        [not v for v in dataset.data.column("image").is_null().to_pylist()]
        if "image" in column_names
        else [False] * len(dataset)
    )
    words = [
        sum(len(t["value"].split()) for t in conv)
        for conv in dataset.data.column("conversations").to_pylist()
    ]
    return [n if img else -n for n, img in zip(words, has_image)]


def modality_grouped_indices(lengths: Sequence[int], group: int, generator: torch.Generator) -> list[int]:
    """The order of the rows (module docstring); ``group`` rows per global step."""
    if any(n == 0 for n in lengths):
        raise ValueError("a row has length 0; every row needs words to group it by length")
    blocks: list[list[int]] = []
    remainders: list[int] = []
    for sign in (1, -1):
        rows = [i for i, n in enumerate(lengths) if n * sign > 0]
        if not rows:
            continue
        order = get_length_grouped_indices([abs(lengths[i]) for i in rows], group, generator=generator)
        ordered = [rows[k] for k in order]
        full = len(ordered) - len(ordered) % group
        blocks += [ordered[s : s + group] for s in range(0, full, group)]
        remainders += ordered[full:]
    shuffled = [blocks[int(k)] for k in torch.randperm(len(blocks), generator=generator)]
    return [i for block in shuffled for i in block] + remainders


class ModalityLengthGroupedSampler(torch.utils.data.Sampler):
    """``modality_grouped_indices`` as a sampler, seeded by ``seed`` + the epoch."""

    def __init__(self, lengths: Sequence[int], group: int, seed: int):
        self.lengths, self.group, self.seed, self.epoch = list(lengths), group, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_grouped_indices(self.lengths, self.group, generator))


class ModalityGroupedSampling:
    """Trainer mixin (before ``Trainer`` in the bases): LLaVA's modality-grouped sampler where the run asks
    for length grouping and the training set has modality lengths; the Trainer's own sampler otherwise."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        args = self.args
        grouped = getattr(args, "train_sampling_strategy", None) == "group_by_length" or getattr(
            args, "group_by_length", False
        )
        lengths = modality_lengths(dataset) if grouped and dataset is not None else None
        if lengths is None:
            return super()._get_train_sampler(train_dataset)
        group = args.train_batch_size * args.world_size * args.gradient_accumulation_steps
        seed = args.data_seed if args.data_seed is not None else args.seed
        return ModalityLengthGroupedSampler(lengths, group, seed)
