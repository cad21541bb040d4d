"""Fused vs two_pass conflict-mask agreement on a trained checkpoint and the mini training mixture.

    .venv/bin/python results/training/mask_agreement.py runs/tiny-stgc-seed0/checkpoint-250

For each beta, the same batches go through STGC's fused mode (one backward; the upstream gradient of a
layer also carries the later layers' CEL gradients) and its two_pass mode (masks from the main loss only);
prints the fraction of (token, expert) pairs whose conflict flag agrees and writes it to
results/training/mask_agreement.csv. The model is not updated.
"""

from __future__ import annotations

import sys

import torch
from datasets import load_from_disk
from transformers import AutoModelForImageTextToText, AutoProcessor

import stgc  # noqa: F401  (registers the model)
from stgc.data.collate import LlavaCollator
from stgc.objectives.config import method_preset
from stgc.objectives.set import ObjectiveSet


def agreement(checkpoint: str, betas=(0.01, 0.1, 1.0), batches: int = 6, batch_size: int = 16) -> None:
    out = []
    torch.set_num_threads(1)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).train()
    collate = LlavaCollator(AutoProcessor.from_pretrained(checkpoint), max_length=192)
    rows = load_from_disk("data/mini/train")["train"]
    moe = model.config.moe_config
    for beta in betas:
        agree = total = conflicts = 0
        for i in range(batches):
            start = 1000 + batch_size * i
            batch = collate([rows[j] for j in range(start, start + batch_size)])
            layers = {}
            for mode in ("fused", "two_pass"):
                model.zero_grad()
                method = ObjectiveSet(method_preset("stgc", beta=beta, mode=mode), moe)
                result = method.step_loss(model, batch, 0)
                result.loss.backward()
                layers[mode] = result.observer.layers
            for layer, two in layers["two_pass"].items():
                fused = layers["fused"][layer]
                assert torch.equal(fused.token_A, two.token_A) and torch.equal(fused.expert_A, two.expert_A)
                agree += int((fused.conflict_A == two.conflict_A).sum())
                total += two.conflict_A.numel()
                conflicts += int(two.conflict_A.sum())
        print(f"beta={beta}: agreement {agree / total:.4f} over {total} pairs ({conflicts} conflicts)")
        out.append(
            {
                "checkpoint": checkpoint,
                "beta": beta,
                "pairs": total,
                "conflicts_two_pass": conflicts,
                "agreement": round(agree / total, 4),
            }
        )
    import pandas as pd

    pd.DataFrame(out).to_csv("results/training/mask_agreement.csv", index=False)


if __name__ == "__main__":
    agreement(sys.argv[1])
