"""Can the tiny tower learn to name the object in each patch? Per-patch supervision (the shape and colour
of the object whose centre lies in the patch, 'none' elsewhere) on freshly drawn shape scenes (1-6 objects
on a 2x2 or 3x3 grid), linear heads on the tokens LLaVA reads. Prints, on 500 held-out POPE-like scenes,
the shape and colour accuracy on object patches and the shape-presence AUC (max over patches); saves the
tower's state dict.

    python results/tiny/experiments/patch_pretrain.py OUT.pt STEPS [LR] [IMAGE,PATCH,WIDTH,LAYERS]
"""

import sys
import time

import numpy as np
import torch
import torch.nn as nn
from sklearn.metrics import roc_auc_score
from transformers import CLIPImageProcessor, CLIPVisionModel

from stgc.backbones import vision_config
from stgc.data.render import COLOR_NAMES, SHAPES
from stgc.vision_stage import scene_batch

out, steps = sys.argv[1], int(sys.argv[2])
lr = float(sys.argv[3]) if len(sys.argv) > 3 else 2e-3
torch.set_num_threads(1)
torch.manual_seed(0)
rng = np.random.default_rng(0)
vision = vision_config("tiny")
if len(sys.argv) > 4:  # IMAGE,PATCH,WIDTH,LAYERS: another tower geometry
    img, patch, width, layers = (int(v) for v in sys.argv[4].split(","))
    vision.image_size, vision.patch_size, vision.num_hidden_layers = img, patch, layers
    vision.hidden_size, vision.intermediate_size = width, 2 * width
side, cells, drawn = vision.image_size, vision.image_size // vision.patch_size, 224


def batch(n: int, grid: int | None = None):
    """stgc.vision_stage.scene_batch's scenes and labels, plus each scene's shape presence (from the labels:
    every object has a patch of its own at these geometries)."""
    images, labels = scene_batch(rng, n, cells, drawn, grids=(grid,) if grid else (2, 3))
    present = np.stack([(labels["shape"] == k + 1).any(1).numpy() for k in range(len(SHAPES))], axis=1)
    return images, labels["shape"], labels["color"], present


proc = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
tower = CLIPVisionModel(vision)
shape_head = nn.Linear(vision.hidden_size, len(SHAPES) + 1)
colour_head = nn.Linear(vision.hidden_size, len(COLOR_NAMES) + 1)
opt = torch.optim.AdamW([*tower.parameters(), *shape_head.parameters(), *colour_head.parameters()], lr=lr)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)


def tokens(images):
    x = proc(images, return_tensors="pt")["pixel_values"]
    return tower(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]


val_images, val_shapes, val_colours, val_present = batch(500, grid=3)
t0 = time.time()
for step in range(steps):
    images, s, c, _ = batch(64)
    h = tokens(images)
    ce = nn.functional.cross_entropy
    loss = ce(shape_head(h).flatten(0, 1), s.flatten()) + ce(colour_head(h).flatten(0, 1), c.flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    if step % 250 == 249 or step == steps - 1:
        with torch.no_grad():
            h = tokens(val_images)
            shape_logits, colour_logits = shape_head(h), colour_head(h)
            obj = val_shapes > 0
            shape_acc = (shape_logits.argmax(-1)[obj] == val_shapes[obj]).float().mean().item()
            colour_acc = (colour_logits.argmax(-1)[obj] == val_colours[obj]).float().mean().item()
            presence = shape_logits.softmax(-1)[..., 1:].amax(1).numpy()
            auc = roc_auc_score(val_present.ravel(), presence.ravel())
        print(
            f"step {step + 1}: object patches: shape acc {shape_acc:.3f}, colour acc {colour_acc:.3f}; "
            f"shape-presence AUC {auc:.3f} ({time.time() - t0:.0f} s)",
            flush=True,
        )
torch.save(tower.state_dict(), out)
