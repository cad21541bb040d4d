"""Round 4: can the tiny language model learn POPE from *perfect* image tokens, and how fast?

The demo's language model (llama tiny: 4 layers, 64 wide, 4 heads; from scratch) sees POPE prompts in
which the 9 image slots (one per cell of a 3 x 3 scene grid, as the 48 px / patch 16 tower gives) hold
oracle embeddings: E[shape word] + E[colour word] of the object in that cell, E[<pad>] for an empty cell
(E: the model's own input embeddings, trained with it). Scenes are symbolic (3-6 objects, the mini suite's
shape prior; negatives drawn the POPE way: random / popular / adversarial), so nothing about the image can
be wrong: only the language model's matching (the asked shape against the slots) has to be learned.
``SHORT_SHARE`` of the training questions take a one-hop form, "<slots>\\n{shape}? ASSISTANT:" (the answer
right after the asked word); the held-out prompts (512) are always POPE's own. AdamW, one-cycle schedule,
gradient clipping 1.0; the held-out yes/no accuracy every 100 steps.

    python results/tiny/experiments/oracle_lm.py data/mini/tokenizer STEPS LR BATCH THREADS [SHORT_SHARE]
"""

import sys
import time

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from stgc.backbones import BACKBONES
from stgc.data.common import SHORT_ANSWER
from stgc.data.render import COLOR_NAMES, SHAPES
from stgc.data.scenes import pope_negative, sample_shapes

tok = AutoTokenizer.from_pretrained(sys.argv[1])
steps, lr, batch_size, threads = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
short_share = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
torch.manual_seed(0)
torch.set_num_threads(threads)
PAD, EOS = tok.pad_token_id, tok.eos_token_id
lm = LlamaForCausalLM(BACKBONES["llama"].text_config("tiny", vocab_size=len(tok), pad_token_id=PAD))
embed = lm.get_input_embeddings()


def word_id(word: str) -> int:
    ids = tok(" " + word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{word!r} is {len(ids)} tokens"
    return ids[0]


SHAPE_IDS = torch.tensor([word_id(s) for s in SHAPES] + [PAD])  # index -1: an empty cell
COLOR_IDS = torch.tensor([word_id(c) for c in COLOR_NAMES] + [PAD])
YES, NO = word_id("yes"), word_id("no")
PREFIX = tok("USER: ", add_special_tokens=True)["input_ids"]
POPE_Q = {
    s: tok(f"\nIs there a {s} in the image?{SHORT_ANSWER} ASSISTANT:", add_special_tokens=False)["input_ids"]
    for s in SHAPES
}
SHORT_Q = {s: tok(f"\n{s}? ASSISTANT:", add_special_tokens=False)["input_ids"] for s in SHAPES}
rng = np.random.default_rng(0)


def make_batch(n: int, short_p: float):
    rows = []
    for _ in range(n):
        k = int(rng.integers(3, 7))
        shapes = sample_shapes(rng, k)
        grid = [(-1, -1)] * 9
        for cell, shape, color in zip(rng.permutation(9)[:k], shapes, rng.integers(len(COLOR_NAMES), size=k)):
            grid[cell] = (SHAPES.index(shape), int(color))
        if rng.random() < 0.5:
            asked, answer = shapes[int(rng.integers(k))], YES
        else:
            category = ("random", "popular", "adversarial")[int(rng.integers(3))]
            asked, answer = pope_negative(rng, shapes, category), NO
        question = SHORT_Q[asked] if rng.random() < short_p else POPE_Q[asked]
        rows.append((grid, PREFIX + [PAD] * 9 + question + [answer, EOS]))
    length = max(len(seq) for _, seq in rows)
    ids = torch.full((n, length), PAD)
    labels = torch.full((n, length), -100)
    for i, (_, seq) in enumerate(rows):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(seq) - 2 : len(seq)] = torch.tensor(seq[-2:])  # the answer and </s>
    slots = torch.zeros(n, length, dtype=torch.bool)
    slots[:, len(PREFIX) : len(PREFIX) + 9] = True
    return ids, labels, slots, torch.tensor([g for g, _ in rows])


def forward(ids, slots, grids, labels=None):
    x = embed(ids).clone()
    oracle = embed(SHAPE_IDS[grids[..., 0]]) + embed(COLOR_IDS[grids[..., 1]]) * (grids[..., 1:] >= 0)
    x[slots] = oracle.reshape(-1, x.shape[-1])
    return lm(inputs_embeds=x, attention_mask=((ids != PAD) | slots).long(), labels=labels)


opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
val_ids, val_labels, val_slots, val_grids = make_batch(512, 0.0)
t0 = time.perf_counter()
for step in range(steps):
    ids, labels, slots, grids = make_batch(batch_size, short_share)
    loss = forward(ids, slots, grids, labels).loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
    opt.step()
    schedule.step()
    if (step + 1) % 100 == 0:
        with torch.no_grad():
            logits = forward(val_ids, val_slots, val_grids).logits
        rows = torch.arange(len(val_ids))
        pos = (val_labels != -100).long().argmax(1) - 1  # the position that predicts the answer
        predicted_no = logits[rows, pos][:, [YES, NO]].argmax(-1)
        accuracy = (predicted_no == (val_labels[rows, pos + 1] == NO).long()).float().mean()
        took = time.perf_counter() - t0
        print(f"step {step + 1} loss {loss.item():.3f} acc {accuracy:.3f} {took:.1f}s", flush=True)
