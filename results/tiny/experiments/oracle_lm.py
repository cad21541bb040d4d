"""Rounds 4 and 4c: can the tiny language model answer from *perfect* image tokens, and how fast?

The demo's language model (llama tiny: 4 layers, 64 wide, 4 heads; from scratch) sees prompts in which
the 9 image slots (one per cell of a 3 x 3 scene grid, as the 48 px / patch 16 tower gives) hold oracle
embeddings: E[shape word] + E[colour word] of the object in that cell, E[<pad>] for an empty cell (E: the
model's own input embeddings, trained with it). Scenes are symbolic (the mini suite's shape prior), so
nothing about the image can be wrong: only the language model's matching has to be learned. TASK:

- ``pope``: 3-6 objects; "Is there a {shape} in the image?" with POPE's prompt, negatives drawn the POPE
  way (random / popular / adversarial). ``SHORT_SHARE`` of the training questions take a one-hop form,
  "<slots>\\n{shape}? ASSISTANT:" (the answer right after the asked word). Held out: 512 POPE prompts;
  prints the yes/no accuracy.
- ``mmbench``: 2-4 objects of distinct colours; MMBench's attribute question "What color is the {shape}?"
  in the suite's MMBench prompt (``stgc.data.prompts.doc_to_text``), the gold colour and 3 wrong ones in a
  random order, answered with the option's letter. Held out: 128 questions in their 4 circular rotations;
  prints the per-row accuracy and the circular accuracy (all 4 rotations right).

AdamW, one-cycle schedule, gradient clipping 1.0; the held-out figures every 100 steps.

    python results/tiny/experiments/oracle_lm.py data/mini/tokenizer TASK STEPS LR BATCH THREADS [SHORT_SHARE]
"""

import sys
import time

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from stgc.backbones import BACKBONES
from stgc.data.bench_scenes import pope_question
from stgc.data.common import SHORT_ANSWER
from stgc.data.prompts import doc_to_text
from stgc.data.render import COLOR_NAMES, SHAPES
from stgc.data.scenes import pope_negative, sample_shapes

tok = AutoTokenizer.from_pretrained(sys.argv[1])
task = sys.argv[2]
steps, lr, batch_size, threads = int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
short_share = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
if task not in ("pope", "mmbench"):
    sys.exit(f"TASK={task!r}: use pope or mmbench")
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
PREFIX = tok("USER: ", add_special_tokens=True)["input_ids"]
CHOICES = [word_id(w) for w in (("yes", "no") if task == "pope" else "ABCD")]  # answer tokens
rng = np.random.default_rng(0)


def ids_of(text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


POPE_Q = {s: ids_of(f"\n{pope_question(s)}{SHORT_ANSWER} ASSISTANT:") for s in SHAPES}
SHORT_Q = {s: ids_of(f"\n{s}? ASSISTANT:") for s in SHAPES}


def pope_items(short_p: float) -> list[tuple]:
    """One POPE question: [(grid, prompt ids, answer choice)]."""
    k = int(rng.integers(3, 7))
    shapes = sample_shapes(rng, k)
    grid = [(-1, -1)] * 9
    for cell, shape, color in zip(rng.permutation(9)[:k], shapes, rng.integers(len(COLOR_NAMES), size=k)):
        grid[cell] = (SHAPES.index(shape), int(color))
    if rng.random() < 0.5:
        asked, answer = shapes[int(rng.integers(k))], 0
    else:
        category = ("random", "popular", "adversarial")[int(rng.integers(3))]
        asked, answer = pope_negative(rng, shapes, category), 1
    return [(grid, SHORT_Q[asked] if rng.random() < short_p else POPE_Q[asked], answer)]


def mmbench_items(rotations: bool) -> list[tuple]:
    """One MMBench attribute question in 1 or 4 circular rotations: [(grid, prompt ids, answer choice)]."""
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
    items = []
    for r in range(4 if rotations else 1):
        rotated = options[r:] + options[:r]
        row = {
            "question": f"What color is the {shapes[target]}?",
            "hint": "nan",
            **dict(zip("ABCD", rotated)),
        }
        items.append((grid, ids_of("\n" + doc_to_text("mmbench", row) + " ASSISTANT:"), rotated.index(gold)))
    return items


def tensors(items: list[tuple]):
    """ids, labels (the answer token and </s>), image-slot mask, grids of [(grid, prompt ids, choice)]."""
    seqs = [PREFIX + [PAD] * 9 + prompt + [CHOICES[a], EOS] for _, prompt, a in items]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), PAD)
    labels = torch.full_like(ids, -100)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(seq) - 2 : len(seq)] = torch.tensor(seq[-2:])
    slots = torch.zeros_like(ids, dtype=torch.bool)
    slots[:, len(PREFIX) : len(PREFIX) + 9] = True
    return ids, labels, slots, torch.tensor([g for g, _, _ in items])


def forward(ids, slots, grids, labels=None):
    x = embed(ids).clone()
    oracle = embed(SHAPE_IDS[grids[..., 0]]) + embed(COLOR_IDS[grids[..., 1]]) * (grids[..., 1:] >= 0)
    x[slots] = oracle.reshape(-1, x.shape[-1])
    return lm(inputs_embeds=x, attention_mask=((ids != PAD) | slots).long(), labels=labels)


if task == "pope":
    held_out, group = [item for _ in range(512) for item in pope_items(0.0)], 1
else:
    held_out, group = [item for _ in range(128) for item in mmbench_items(rotations=True)], 4
val, gold = tensors(held_out), torch.tensor([a for _, _, a in held_out])
opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
t0 = time.perf_counter()
for step in range(steps):
    items = []
    for _ in range(batch_size):
        items += pope_items(short_share) if task == "pope" else mmbench_items(rotations=False)
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
        pos = (labels != -100).long().argmax(1) - 1  # the position that predicts the answer
        right = logits[torch.arange(len(ids)), pos][:, CHOICES].argmax(-1) == gold
        circular = f" circular {right.view(-1, group).all(1).float().mean():.3f}" if group > 1 else ""
        took = time.perf_counter() - t0
        print(
            f"step {step + 1} loss {loss.item():.3f} acc {right.float().mean():.3f}{circular} {took:.1f}s",
            flush=True,
        )
