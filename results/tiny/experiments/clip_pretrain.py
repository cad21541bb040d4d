"""Contrastive (CLIP) pretraining of the tiny vision tower on the mini mixture: each training image against
the text of its conversation (questions and answers), transformers' CLIPModel and its own loss, a 2-layer
text tower over the suite's tokenizer. Saves the vision tower's state dict (CLIPVisionModel keys) for
run_experiment.py's vision_init. 600 steps of 128 pairs: ~55 s on one CPU thread.

    python results/tiny/experiments/clip_pretrain.py DATA OUT.pt STEPS [THREADS] [LR]

DATA: a mini-suite folder (its train/ and tokenizer/).
"""

import sys
import time

import torch
from datasets import load_from_disk
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig

from stgc.backbones import vision_config

data, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
lr = float(sys.argv[5]) if len(sys.argv) > 5 else 2e-3
torch.manual_seed(0)
rows = load_from_disk(data + "/train")
if hasattr(rows, "keys"):
    rows = rows["train"]
tok = AutoTokenizer.from_pretrained(data + "/tokenizer")
vision = vision_config("tiny")
text = CLIPTextConfig(
    vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=64, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    bos_token_id=tok.bos_token_id,
)  # fmt: skip
model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32))
side = vision.image_size
proc = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
t0 = time.time()
pixels = torch.cat(
    [proc(rows[i : i + 256]["image"], return_tensors="pt")["pixel_values"] for i in range(0, len(rows), 256)]
)
texts = [" ".join(t["value"].replace("<image>", "") for t in conv) for conv in rows["conversations"]]
enc = tok(texts, truncation=True, max_length=63, padding="max_length", return_tensors="pt")
n = len(texts)
ids = torch.cat([enc.input_ids, torch.full((n, 1), tok.pad_token_id)], 1)
mask = torch.cat([enc.attention_mask, torch.zeros(n, 1, dtype=torch.long)], 1)
ends = mask.sum(1)  # CLIP's text tower pools at the EOS token
ids[torch.arange(n), ends] = tok.eos_token_id
mask[torch.arange(n), ends] = 1
opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
g = torch.Generator().manual_seed(0)
for step in range(steps):
    idx = torch.randint(n, (128,), generator=g)
    outputs = model(input_ids=ids[idx], attention_mask=mask[idx], pixel_values=pixels[idx], return_loss=True)
    loss = outputs.loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    if step % 100 == 99:
        print(f"step {step + 1}: contrastive loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
torch.save(model.vision_model.state_dict(), out)
