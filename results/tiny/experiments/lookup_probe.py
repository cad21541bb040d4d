"""Round 5: how long does the tiny language model take to learn MMBench's option lookup, alone?

Text only, no image: "Which option is {colour}?" in MMBench's prompt (the suite's ``doc_to_text``) with 4
distinct colours as options A-D, answered with the letter. Nothing else has to be learned: the word to
find is in the question. The demo's language model (llama tiny: 4 layers, 64 wide, 4 heads; from
scratch), AdamW, one-cycle schedule, gradient clipping 1.0, batch BATCH; held-out accuracy on 512
questions every 100 steps, never trained on (a training draw equal to one is drawn again; the space is
small: 1,680 orderings of 4 of the 8 colours x 4 answers). SEED in the environment: the seed (default 0).
WIDTH overrides the hidden size (intermediate: twice it), HEADS the number of heads (head size: width /
heads), THETA the rotary base (llama's default 10,000). With FORMAT=plain in
the environment the prompt is a plainer one: the question, then one option per line, then MMBench's
instruction (no "There are several options:"); with FORMAT=plain:N training switches to MMBench's own
prompt after step N (a curriculum), and the held-out questions are in MMBench's prompt throughout. With
FORMAT=last the options come first, one per line, and the question last, right before the answer.

    python results/tiny/experiments/lookup_probe.py data/mini/tokenizer STEPS LR BATCH [WIDTH HEADS THETA]
"""

import os
import sys
import time

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from stgc.backbones import BACKBONES
from stgc.data.common import OPTION_LETTER
from stgc.data.prompts import doc_to_text
from stgc.data.render import COLOR_NAMES

FORMAT = os.environ.get("FORMAT", "")
PLAIN = FORMAT.startswith("plain")
LAST = FORMAT == "last"
SWITCH = int(FORMAT.split(":")[1]) if ":" in FORMAT else None
tok = AutoTokenizer.from_pretrained(sys.argv[1])
steps, lr, batch_size = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
SEED = int(os.environ.get("SEED", "0"))
torch.manual_seed(SEED)
torch.set_num_threads(1)
PAD, EOS = tok.pad_token_id, tok.eos_token_id
config = BACKBONES["llama"].text_config("tiny", vocab_size=len(tok), pad_token_id=PAD)
if len(sys.argv) > 5:
    config.hidden_size, config.intermediate_size = int(sys.argv[5]), 2 * int(sys.argv[5])
    config.num_attention_heads = config.num_key_value_heads = int(sys.argv[6])
    config.head_dim = config.hidden_size // config.num_attention_heads
    config.rope_parameters = {**config.rope_parameters, "rope_theta": float(sys.argv[7])}
lm = LlamaForCausalLM(config)
print(config.hidden_size, config.num_attention_heads, config.head_dim, config.rope_parameters, flush=True)
rng = np.random.default_rng(SEED)
HELD_OUT: set[tuple] = set()  # (options, gold) of the held-out questions: never trained on
PREFIX = tok("USER: ", add_special_tokens=True)["input_ids"]
LETTERS = [tok(" " + x, add_special_tokens=False)["input_ids"][0] for x in "ABCD"]


def item() -> tuple[list[int], int]:
    while True:
        options = [str(c) for c in rng.choice(COLOR_NAMES, 4, replace=False)]
        gold = int(rng.integers(4))
        if (tuple(options), gold) not in HELD_OUT:
            break
    if COLLECT:
        HELD_OUT.add((tuple(options), gold))
    row = {"question": f"Which option is {options[gold]}?", "hint": "nan", **dict(zip("ABCD", options))}
    if LAST:
        lines = "".join(f"{letter}. {o}\n" for letter, o in zip("ABCD", options))
        text = f"\n{lines}{row['question']} ASSISTANT:"
    elif PLAIN:
        lines = "".join(f"{letter}. {o}\n" for letter, o in zip("ABCD", options))
        text = f"\n{row['question']}\n{lines}{OPTION_LETTER.strip()} ASSISTANT:"
    else:
        text = "\n" + doc_to_text("mmbench", row) + " ASSISTANT:"
    return PREFIX + tok(text, add_special_tokens=False)["input_ids"], gold


def batch(n: int):
    items = [item() for _ in range(n)]
    seqs = [prompt + [LETTERS[gold], EOS] for prompt, gold in items]
    ids = torch.full((n, max(map(len, seqs))), PAD)
    labels = torch.full_like(ids, -100)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(seq) - 2 : len(seq)] = torch.tensor(seq[-2:])
    return ids, labels, torch.tensor([gold for _, gold in items])


if SWITCH is not None:
    PLAIN = False
COLLECT = True
val_ids, val_labels, val_gold = batch(512)
COLLECT = False
PLAIN = FORMAT.startswith("plain")
opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
t0 = time.perf_counter()
for step in range(steps):
    if SWITCH is not None and step == SWITCH:
        PLAIN = False
    ids, labels, _ = batch(batch_size)
    loss = lm(input_ids=ids, attention_mask=(ids != PAD).long(), labels=labels).loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
    opt.step()
    schedule.step()
    if (step + 1) % 100 == 0:
        with torch.no_grad():
            logits = lm(input_ids=val_ids, attention_mask=(val_ids != PAD).long()).logits
        pos = (val_labels != -100).long().argmax(1) - 1
        acc = (logits[torch.arange(len(val_ids)), pos][:, LETTERS].argmax(-1) == val_gold).float().mean()
        print(
            f"step {step + 1} loss {loss.item():.3f} acc {acc:.3f} {time.perf_counter() - t0:.0f}s",
            flush=True,
        )
