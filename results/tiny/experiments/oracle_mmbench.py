"""Round 4c: MMBench's attribute questions from *perfect* image tokens (the companion of oracle_lm.py).

The same language model and oracle slots as ``oracle_lm.py`` (E[shape word] + E[colour word] per occupied
cell of a 3 x 3 grid), on MMBench-style attribute questions in the suite's MMBench prompt
(``stgc.data.prompts.doc_to_text("mmbench", ...)``): "What color is the {shape}? There are several
options: A. .. B. .. C. .. D. ..", answered with the option's letter; 2-4 objects of distinct colours,
the gold colour and 3 wrong ones in a random order. Held out: 128 questions in their 4 circular rotations;
prints the per-row accuracy and the circular accuracy (a question counts when all 4 rotations are right)
every 100 steps.

    python results/tiny/experiments/oracle_mmbench.py data/mini/tokenizer STEPS LR BATCH THREADS
"""

import sys
import time

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from stgc.backbones import BACKBONES
from stgc.data.prompts import doc_to_text
from stgc.data.render import COLOR_NAMES, SHAPES
from stgc.data.scenes import sample_shapes

tok = AutoTokenizer.from_pretrained(sys.argv[1])
steps, lr, batch_size, threads = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
torch.set_num_threads(threads)
PAD, EOS = tok.pad_token_id, tok.eos_token_id
lm = LlamaForCausalLM(BACKBONES["llama"].text_config("tiny", vocab_size=len(tok), pad_token_id=PAD))
embed = lm.get_input_embeddings()


def word_id(word: str) -> int:
    ids = tok(" " + word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{word!r} is {len(ids)} tokens"
    return ids[0]


SHAPE_IDS = torch.tensor([word_id(s) for s in SHAPES] + [PAD])
COLOR_IDS = torch.tensor([word_id(c) for c in COLOR_NAMES] + [PAD])
LETTERS = [word_id(x) for x in "ABCD"]
PREFIX = tok("USER: ", add_special_tokens=True)["input_ids"]
rng = np.random.default_rng(0)


def question(rotations: bool):
    """One attribute question: (grid, [(prompt ids, gold letter index)] for 1 or 4 rotations)."""
    k = int(rng.integers(2, 5))
    shapes = sample_shapes(rng, k)
    colors = [int(c) for c in rng.choice(len(COLOR_NAMES), size=k, replace=False)]
    grid = [(-1, -1)] * 9
    for cell, shape, color in zip(rng.permutation(9)[:k], shapes, colors):
        grid[cell] = (SHAPES.index(shape), color)
    target = int(rng.integers(k))
    gold = COLOR_NAMES[colors[target]]
    wrong = [str(c) for c in rng.choice([c for c in COLOR_NAMES if c != gold], size=3, replace=False)]
    options = [gold, *wrong]
    options = [options[i] for i in rng.permutation(4)]
    prompts = []
    for r in range(4 if rotations else 1):
        rotated = options[r:] + options[:r]
        row = {"question": f"What color is the {shapes[target]}?", "hint": "nan"}
        row.update(zip("ABCD", rotated))
        text = "\n" + doc_to_text("mmbench", row) + " ASSISTANT:"
        prompts.append((tok(text, add_special_tokens=False)["input_ids"], rotated.index(gold)))
    return grid, prompts


def tensors(items):
    """items: [(grid, prompt ids, gold index)] -> ids, labels, slots, grids."""
    seqs = [(g, PREFIX + [PAD] * 9 + p + [LETTERS[a], EOS]) for g, p, a in items]
    length = max(len(s) for _, s in seqs)
    ids = torch.full((len(seqs), length), PAD)
    labels = torch.full_like(ids, -100)
    for i, (_, seq) in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(seq) - 2 : len(seq)] = torch.tensor(seq[-2:])
    slots = torch.zeros_like(ids, dtype=torch.bool)
    slots[:, len(PREFIX) : len(PREFIX) + 9] = True
    return ids, labels, slots, torch.tensor([g for g, _ in seqs])


def forward(ids, slots, grids, labels=None):
    x = embed(ids).clone()
    oracle = embed(SHAPE_IDS[grids[..., 0]]) + embed(COLOR_IDS[grids[..., 1]]) * (grids[..., 1:] >= 0)
    x[slots] = oracle.reshape(-1, x.shape[-1])
    return lm(inputs_embeds=x, attention_mask=((ids != PAD) | slots).long(), labels=labels)


held_out = [question(rotations=True) for _ in range(128)]
val = tensors([(g, p, a) for g, rows in held_out for p, a in rows])
opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
t0 = time.perf_counter()
for step in range(steps):
    items = []
    for _ in range(batch_size):
        g, rows = question(rotations=False)
        items.append((g, *rows[0]))
    ids, labels, slots, grids = tensors(items)
    loss = forward(ids, slots, grids, labels).loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
    opt.step()
    schedule.step()
    if (step + 1) % 100 == 0:
        ids, labels, slots, grids = val
        with torch.no_grad():
            logits = forward(ids, slots, grids).logits
        rows = torch.arange(len(ids))
        pos = (labels != -100).long().argmax(1) - 1
        right = logits[rows, pos][:, LETTERS].argmax(-1) == torch.tensor(
            [a for _, r in held_out for _, a in r]
        )
        circular = right.view(-1, 4).all(1).float().mean()
        took = time.perf_counter() - t0
        print(
            f"step {step + 1} loss {loss.item():.3f} per-row {right.float().mean():.3f} "
            f"circular {circular:.3f} {took:.1f}s",
            flush=True,
        )
