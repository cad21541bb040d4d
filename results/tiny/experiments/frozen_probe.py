"""What a frozen tiny vision tower's features say about a scene: logistic regressions (scikit-learn) on the
patch tokens the LM would see (mean, max and all 16 tokens of the layer LLaVA reads), one per shape and one
per colour (present or not), 2,000 training and 1,000 held-out POPE-like scenes (3-6 objects, 3x3 grid).
Prints the mean held-out AUC over shapes and over colours.

    python results/tiny/experiments/frozen_probe.py random|TOWER.pt
"""

import sys

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from transformers import CLIPImageProcessor, CLIPVisionModel

from stgc.backbones import vision_config
from stgc.data.render import COLOR_NAMES, SHAPES, draw_scene, sample_scene
from stgc.data.scenes import sample_shapes

torch.set_num_threads(1)
torch.manual_seed(0)
rng = np.random.default_rng(1)
images, shape_labels, colour_labels = [], [], []
for _ in range(3000):
    shapes = sample_shapes(rng, int(rng.integers(3, 7)))
    colours = [COLOR_NAMES[int(i)] for i in rng.integers(len(COLOR_NAMES), size=len(shapes))]
    images.append(draw_scene(rng, sample_scene(rng, 224, shapes, colours, grid=3), 224))
    shape_labels.append([s in shapes for s in SHAPES])
    colour_labels.append([c in colours for c in COLOR_NAMES])
vision = vision_config("tiny")
tower = CLIPVisionModel(vision)
if sys.argv[1] != "random":
    tower.load_state_dict(torch.load(sys.argv[1]))
side = vision.image_size
proc = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
with torch.no_grad():
    tokens = torch.cat(
        [
            tower(
                pixel_values=proc(images[i : i + 250], return_tensors="pt")["pixel_values"],
                output_hidden_states=True,
            ).hidden_states[-2][:, 1:]
            for i in range(0, len(images), 250)
        ]
    )
features = torch.cat([tokens.mean(1), tokens.amax(1), tokens.flatten(1)], 1).numpy()


def mean_auc(labels: np.ndarray) -> float:
    aucs = []
    for j in range(labels.shape[1]):
        fit = LogisticRegression(max_iter=2000).fit(features[:2000], labels[:2000, j])
        aucs.append(roc_auc_score(labels[2000:, j], fit.decision_function(features[2000:])))
    return float(np.mean(aucs))


shape_auc, colour_auc = mean_auc(np.array(shape_labels)), mean_auc(np.array(colour_labels))
print(f"{sys.argv[1]}: shape AUC {shape_auc:.3f}, colour AUC {colour_auc:.3f}")
