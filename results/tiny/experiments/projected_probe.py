"""What the language model receives from the image: a trained dense checkpoint's projected image tokens
(the LM's inputs) for 2,000 shape scenes; their spread across positions relative to their norm, and the
held-out AUC of logistic regressions (1,400 / 600 scenes) for each colour's and each shape's presence.

    python results/tiny/experiments/projected_probe.py CHECKPOINT
"""

import sys

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from transformers import AutoProcessor, LlavaForConditionalGeneration

from stgc.data.render import COLOR_NAMES, SHAPES, draw_scene, sample_scene
from stgc.data.scenes import sample_shapes

torch.set_num_threads(1)
checkpoint = sys.argv[1]
model = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
processor = AutoProcessor.from_pretrained(checkpoint)
rng = np.random.default_rng(1)
images, present, shape_present = [], [], []
for _ in range(2000):
    shapes = sample_shapes(rng, int(rng.integers(3, 7)))
    colours = [COLOR_NAMES[int(i)] for i in rng.integers(len(COLOR_NAMES), size=len(shapes))]
    images.append(draw_scene(rng, sample_scene(rng, 224, shapes, colours), 224))
    present.append([c in colours for c in COLOR_NAMES])
    shape_present.append([s in shapes for s in SHAPES])
present, shape_present = np.array(present), np.array(shape_present)
tokens = []
with torch.no_grad():
    for i in range(0, len(images), 200):
        pixels = processor.image_processor(images[i : i + 200], return_tensors="pt")["pixel_values"]
        out = model.model.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        )
        out = getattr(out, "pooler_output", out)  # transformers 5: the projected features are pooler_output
        out = torch.stack(list(out)) if isinstance(out, (list, tuple)) else out
        tokens.append(out.reshape(len(pixels), -1, out.shape[-1]))
h = torch.cat(tokens)
spread = float((h - h.mean(1, keepdim=True)).norm(dim=-1).mean() / h.norm(dim=-1).mean())
features = torch.cat([h.mean(1), h.amax(1), h.flatten(1)], 1).numpy()
aucs = []
for j in range(len(COLOR_NAMES)):
    fit = LogisticRegression(max_iter=3000).fit(features[:1400], present[:1400, j])
    aucs.append(roc_auc_score(present[1400:, j], fit.decision_function(features[1400:])))
shape_aucs = []
for j in range(len(SHAPES)):
    fit = LogisticRegression(max_iter=3000).fit(features[:1400], shape_present[:1400, j])
    shape_aucs.append(roc_auc_score(shape_present[1400:, j], fit.decision_function(features[1400:])))
colour_auc, shape_auc = float(np.mean(aucs)), float(np.mean(shape_aucs))
print(f"{checkpoint}: {tuple(h.shape)} projected tokens, spread across positions / norm {spread:.3f}, "
      f"colour-presence AUC {colour_auc:.3f}, shape-presence AUC {shape_auc:.3f}")  # fmt: skip
