"""Can the tiny CLIP tower see which shapes a scene holds? A tiny CLIPVisionModel trained from scratch with a
direct multi-label objective (shape present or not; max over patch tokens of a linear head), no language
model. Prints the validation AUC every 100 steps.

    python results/tiny/experiments/vision_probe.py PX PATCH HIDDEN STEPS [N_MIN N_MAX GRID]

PX/PATCH/HIDDEN: image size, patch size and width of the tower; N_MIN..N_MAX objects on a GRID x GRID
layout (the mini suite's POPE scenes: 3 6 3).
"""

import sys
import time

import numpy as np
import torch
import torch.nn as nn
from sklearn.metrics import roc_auc_score
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from stgc.data.render import COLOR_NAMES, SHAPES, draw_scene, sample_scene
from stgc.data.scenes import sample_shapes

px, patch, hidden, steps = (int(a) for a in sys.argv[1:5])
n_min, n_max, grid = (int(a) for a in sys.argv[5:8]) if len(sys.argv) > 5 else (3, 6, 3)
torch.set_num_threads(1)
torch.manual_seed(0)
rng = np.random.default_rng(0)


def batch(n: int):
    images, labels = [], []
    for _ in range(n):
        shapes = sample_shapes(rng, int(rng.integers(n_min, n_max + 1)))
        colors = [COLOR_NAMES[int(i)] for i in rng.integers(len(COLOR_NAMES), size=len(shapes))]
        images.append(draw_scene(rng, sample_scene(rng, 224, shapes, colors, grid=grid), 224))
        labels.append(torch.tensor([float(s in shapes) for s in SHAPES]))
    return images, torch.stack(labels)


proc = CLIPImageProcessor(size={"shortest_edge": px}, crop_size={"height": px, "width": px})
cfg = CLIPVisionConfig(
    hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
    image_size=px, patch_size=patch,
)  # fmt: skip
tower, head = CLIPVisionModel(cfg), nn.Linear(hidden, len(SHAPES))
opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=1e-3)


def scores(x):
    return head(tower(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]).max(1).values


val_images, val_y = batch(400)
val_x = proc(val_images, return_tensors="pt")["pixel_values"]
t0 = time.time()
for step in range(steps):
    images, y = batch(32)
    x = proc(images, return_tensors="pt")["pixel_values"]
    loss = nn.functional.binary_cross_entropy_with_logits(scores(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 99:
        with torch.no_grad():
            auc = roc_auc_score(val_y.numpy().ravel(), scores(val_x).numpy().ravel())
        elapsed = time.time() - t0
        print(f"{px} px patch {patch} hidden {hidden} step {step + 1}: val AUC {auc:.3f} ({elapsed:.0f} s)")
