"""A "stage 1" for a language model that knows no words yet: train the tiny tower and projector so that each
patch's projected token points where the (frozen, randomly initialised) input embeddings of its object's
colour word and shape word point (cosine softmax over the 18 colour and shape words, one cross-entropy
each), on freshly drawn shape scenes. Saves a dense LLaVA checkpoint (every other weight at its random
initialisation) for a dense run's model.init.

    python results/tiny/experiments/align_pretrain.py SUITE OUT_DIR STEPS [LR]
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from stgc.data.render import COLOR_NAMES, SHAPES
from stgc.modeling import build_llava_config, build_processor
from stgc.vision_stage import scene_batch

suite, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
lr = float(sys.argv[4]) if len(sys.argv) > 4 else 2e-3
torch.set_num_threads(1)
torch.manual_seed(0)
rng = np.random.default_rng(0)
tokenizer = AutoTokenizer.from_pretrained(suite / "tokenizer")
image_token_id = tokenizer.convert_tokens_to_ids("<image>")
config = build_llava_config(
    "llama",
    "tiny",
    vocab_size=len(tokenizer),
    image_token_id=image_token_id,
    pad_token_id=tokenizer.pad_token_id,
)
model = LlavaForConditionalGeneration(config)
vision = config.vision_config
processor = build_processor(tokenizer, vision.image_size, vision.patch_size)
side, cells, drawn = vision.image_size, vision.image_size // vision.patch_size, 224


def word_id(word: str) -> int:
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    ids = [i for i in ids if tokenizer.convert_ids_to_tokens(i) not in ("▁", "Ġ", " ")]
    assert len(ids) == 1, (word, tokenizer.convert_ids_to_tokens(ids))
    return ids[0]


shape_ids = torch.tensor([word_id(s) for s in SHAPES])
colour_ids = torch.tensor([word_id(c) for c in COLOR_NAMES])
embed = model.get_input_embeddings().weight.detach()


def batch(n: int, grid: int | None = None):
    """stgc.vision_stage.scene_batch's scenes, labels 0-based with -100 where a patch holds no object."""
    images, labels = scene_batch(rng, n, cells, drawn, grids=(grid,) if grid else (2, 3))
    shape, color = labels["shape"], labels["color"]
    return images, torch.where(shape > 0, shape - 1, -100), torch.where(color > 0, color - 1, -100)


def tokens(images):
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    feats = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    return model.model.multi_modal_projector(feats)


def logits(h, ids):
    return 10 * nn.functional.normalize(h, dim=-1) @ nn.functional.normalize(embed[ids], dim=-1).T


params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]
opt = torch.optim.AdamW(params, lr=lr)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
val_images, val_s, val_c = batch(500, grid=3)
t0 = time.time()
for step in range(steps):
    images, s, c = batch(64)
    h = tokens(images)
    ce = nn.functional.cross_entropy
    loss = ce(logits(h, shape_ids).flatten(0, 1), s.flatten()) + ce(
        logits(h, colour_ids).flatten(0, 1), c.flatten()
    )
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    if step % 250 == 249 or step == steps - 1:
        with torch.no_grad():
            h = tokens(val_images)
            obj = val_s >= 0
            sa = (logits(h, shape_ids).argmax(-1)[obj] == val_s[obj]).float().mean().item()
            ca = (logits(h, colour_ids).argmax(-1)[obj] == val_c[obj]).float().mean().item()
        norms = f"token norm {h.norm(dim=-1).mean():.3f}, word norm {embed.norm(dim=-1).mean():.3f}"
        print(
            f"step {step + 1}: loss {loss.item():.3f}; object patches: shape acc {sa:.3f}, "
            f"colour acc {ca:.3f} ({time.time() - t0:.0f} s); {norms}",
            flush=True,
        )
model.save_pretrained(out)
processor.save_pretrained(out)
