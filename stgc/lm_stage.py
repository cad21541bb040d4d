"""Stage L: a language model that arrives knowing how to match, for a model size with no pretrained LLM.

MoE-LLaVA starts from a pretrained LLM (StableLM, Qwen, Phi-2) that already attends from a question to
the matching words of its context. The tiny model's language model starts random, and the skills the
matching benchmarks need grow in it only after long plateaus: on 2 CPU cores the demo's dense stage
never leaves them (POPE, MMBench and ScienceQA-IMG stay at or below a constant answer; 11,000 GPU steps
on 8x the data did not either; results/tiny/experiments/README.md). So the tiny language model can be
pretrained first, as an LLM is, on text about scenes, and saved once (``stgc pretrain-lm``); a run
starts from such a folder with ``model.text_init`` (``slot_pretrain``: the one shipped in
``stgc/assets/<size>-lm``, when there is one).

The "text" is symbolic: each of the 9 image positions (one per patch of the 48 px / patch 16 tower, one
per cell of the scenes' 3 x 3 grid) holds ``E[shape] + E[colour]`` of the object in that cell, or zero
for an empty cell (E: the model's own input embeddings, trained with it), so the language model learns
to read objects at image positions before it ever sees an image. ``align_projector`` later trains the
LLaVA projector to produce exactly these vectors from the frozen stage-0 tower (``stgc.vision_stage``).
Questions are the mini suite's own, rendered by ``stgc.data.prompts.doc_to_text`` with its answers:

- ``pope``: "Is there a {shape} in the image?" (3-6 objects; negatives drawn the POPE way);
  ``pope_short``: the same as "{shape}?", the answer right after the asked word (a one-hop curriculum);
- ``color``: VQAv2's "What color is the {shape}?" (1-4 objects of distinct colours), a colour word;
- ``lookup``: MMBench's prompt with no image, "Which option is {word}?" over 4 colours or shapes;
  ``lookup_plain``: the same with one option per line and no "There are several options:" (a curriculum
  step; results/tiny/experiments/README.md, round 5, measures how long either takes);
- ``mmbench``: MMBench's attribute question, "What color is the {shape}?" over 4 colour options;
- ``scienceqa``: ScienceQA-IMG's material question (the hint names a colour, the options shapes).

The stage runs in phases (``LMStage.phases``): each matching skill is trained alone (with replays of the
earlier ones) until its held-out accuracy reaches a target (held-out questions are never trained on),
then all are mixed while the learning rate anneals. ``lm_stage.json`` beside the weights records the
settings, the steps each phase took and the held-out accuracy of every task. On a GPU it runs on ``cuda``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

STAGE_FILE = "lm_stage.json"
# what a language model loaded into a LLaVA must share with the LLaVA's text config
TEXT_SHAPE_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters",
    "tie_word_embeddings", "attention_bias", "mlp_bias",
)  # fmt: skip
SLOTS = 9  # image positions: the tiny tower's 3 x 3 patches, the scenes' 3 x 3 cells
TASKS = ("pope", "pope_short", "color", "lookup_plain", "lookup", "mmbench", "scienceqa")


@dataclasses.dataclass(frozen=True)
class Phase:
    """Train on ``weights`` (task -> share of the batch) until the held-out accuracy of ``goal`` reaches
    ``target`` (checked every 100 steps; ``circular`` for the MMBench-style tasks), or for ``max_steps``.
    Without a goal the phase runs ``max_steps`` with the learning rate falling linearly to 0."""

    weights: dict[str, float]
    max_steps: int
    goal: str | None = None
    target: float = 0.9


# each matching skill alone until it is learned (where its plateau is shortest), then the next with
# replays of the earlier ones, then everything mixed while the learning rate anneals
DEFAULT_PHASES: tuple[Phase, ...] = (
    Phase({"lookup_plain": 1.0}, 5000, goal="lookup_plain", target=0.8),
    Phase({"lookup": 3.0, "lookup_plain": 1.0}, 5000, goal="lookup", target=0.8),
    Phase({"pope": 6.0, "pope_short": 3.0, "lookup": 1.0}, 6000, goal="pope", target=0.85),
    Phase({"color": 6.0, "pope": 2.0, "lookup": 1.0}, 5000, goal="color", target=0.85),
    Phase(
        {"mmbench": 5.0, "scienceqa": 2.0, "color": 1.0, "pope": 1.0, "lookup": 1.0},
        6000,
        goal="mmbench",
        target=0.5,
    ),  # fmt: skip
    Phase(
        {"mmbench": 3.0, "scienceqa": 2.0, "color": 2.0, "pope": 2.0, "pope_short": 0.5, "lookup": 1.0}, 1500
    ),
)
CIRCULAR_TASKS = (
    "lookup_plain",
    "lookup",
    "mmbench",
)  # held out in all 4 rotations; their goal is circular accuracy


@dataclasses.dataclass(frozen=True)
class LMStage:
    """Settings of stage L: its phases, batch, peak learning rate (after ``warmup`` steps), seed."""

    phases: tuple[Phase, ...] = DEFAULT_PHASES
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 200
    seed: int = 0
    val_items: int = 128  # held-out questions per task (MMBench-style ones in all 4 rotations)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------- questions


@dataclasses.dataclass
class _Item:
    grid: list[tuple[int, int]]  # per slot: (shape index, colour index), (-1, -1) when empty
    prompt: str  # the user turn after the image, ending with " ASSISTANT:"
    answer: str

    @property
    def key(self) -> tuple:
        return (tuple(self.grid), self.prompt)


class _Questions:
    """The stage's question generators on symbolic scenes (one random stream)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def scene(self, k_min: int, k_max: int, distinct_colors: bool = False) -> tuple[list, list, list]:
        from stgc.data.render import COLOR_NAMES, SHAPES
        from stgc.data.scenes import sample_shapes

        rng = self.rng
        k = int(rng.integers(k_min, k_max + 1))
        shapes = sample_shapes(rng, k)
        n = len(COLOR_NAMES)
        colors = [
            int(c) for c in (rng.choice(n, k, replace=False) if distinct_colors else rng.integers(n, size=k))
        ]
        grid = [(-1, -1)] * SLOTS
        for cell, shape, color in zip(rng.permutation(SLOTS)[:k], shapes, colors):
            grid[int(cell)] = (SHAPES.index(shape), color)
        return shapes, colors, grid

    @staticmethod
    def _turn(name: str, row: dict[str, Any]) -> str:
        from stgc.data.prompts import doc_to_text

        return "\n" + doc_to_text(name, row) + " ASSISTANT:"

    def _choice(
        self, question: str, options: list[str], gold: str, grid: list, rotations: bool
    ) -> list[_Item]:
        """MMBench-style: one row, or the four circular rotations of the options."""
        from stgc.data.bench_choice import circular_rotations

        items = []
        for rotated in circular_rotations(options)[: 4 if rotations else 1]:
            row = {"question": question, "hint": "nan", **dict(zip("ABCD", rotated))}
            items.append(_Item(grid, self._turn("mmbench", row), "ABCD"[rotated.index(gold)]))
        return items

    def pope(self, rotations: bool = False, short: bool = False) -> list[_Item]:
        from stgc.data.bench_scenes import pope_question
        from stgc.data.scenes import pope_negative

        rng = self.rng
        shapes, _, grid = self.scene(3, 6)
        if rng.random() < 0.5:
            asked, answer = shapes[int(rng.integers(len(shapes)))], "yes"
        else:
            category = ("random", "popular", "adversarial")[int(rng.integers(3))]
            asked, answer = pope_negative(rng, shapes, category), "no"
        prompt = f"\n{asked}? ASSISTANT:" if short else self._turn("pope", {"question": pope_question(asked)})
        return [_Item(grid, prompt, answer)]

    def pope_short(self, rotations: bool = False) -> list[_Item]:
        return self.pope(short=True)

    def color(self, rotations: bool = False) -> list[_Item]:
        from stgc.data.render import COLOR_NAMES

        shapes, colors, grid = self.scene(1, 4, distinct_colors=True)
        k = int(self.rng.integers(len(shapes)))
        prompt = self._turn("vqav2", {"question": f"What color is the {shapes[k]}?"})
        return [_Item(grid, prompt, COLOR_NAMES[colors[k]])]

    def lookup(self, rotations: bool = False, plain: bool = False) -> list[_Item]:
        from stgc.data.common import OPTION_LETTER
        from stgc.data.render import COLOR_NAMES, SHAPES

        rng = self.rng
        words = COLOR_NAMES if rng.random() < 0.5 else SHAPES
        options = [str(w) for w in rng.choice(words, 4, replace=False)]
        gold = options[int(rng.integers(4))]
        question, empty = f"Which option is {gold}?", [(-1, -1)] * SLOTS
        if not plain:
            return self._choice(question, options, gold, empty, rotations)
        from stgc.data.bench_choice import circular_rotations

        items = []
        for rotated in circular_rotations(options)[: 4 if rotations else 1]:
            lines = "".join(f"{letter}. {o}\n" for letter, o in zip("ABCD", rotated))
            prompt = f"\n{question}\n{lines}{OPTION_LETTER.strip()} ASSISTANT:"
            items.append(_Item(empty, prompt, "ABCD"[rotated.index(gold)]))
        return items

    def lookup_plain(self, rotations: bool = False) -> list[_Item]:
        return self.lookup(rotations, plain=True)

    def mmbench(self, rotations: bool = False) -> list[_Item]:
        from stgc.data.render import COLOR_NAMES

        rng = self.rng
        shapes, colors, grid = self.scene(2, 4, distinct_colors=True)
        k = int(rng.integers(len(shapes)))
        gold = COLOR_NAMES[colors[k]]
        wrong = [str(c) for c in rng.choice([c for c in COLOR_NAMES if c != gold], 3, replace=False)]
        options = [gold, *wrong]
        options = [options[int(i)] for i in rng.permutation(4)]
        return self._choice(f"What color is the {shapes[k]}?", options, gold, grid, rotations)

    def scienceqa(self, rotations: bool = False) -> list[_Item]:
        from stgc.data.bench_choice import MATERIALS, material_question
        from stgc.data.render import COLOR_NAMES

        rng = self.rng
        shapes, colors, grid = self.scene(3, 3, distinct_colors=True)
        k = int(rng.integers(3))
        question, hint = material_question(str(rng.choice(MATERIALS)), COLOR_NAMES[colors[k]])
        row = {"question": question, "hint": hint, "choices": [f"the {s}" for s in shapes]}
        return [_Item(grid, self._turn("scienceqa_img", row), "ABC"[k])]


# ----------------------------------------------------------------------------------------------- stage


class _SlotLM:
    """A causal LM whose 9 image positions hold E[shape] + E[colour] (tokenised batches of _Items)."""

    def __init__(self, lm: Any, tokenizer: Any):
        from stgc.data.render import COLOR_NAMES, SHAPES

        self.lm, self.tok = lm, tokenizer
        pad = tokenizer.pad_token_id
        self.shape_ids = torch.tensor([word_id(tokenizer, s) for s in SHAPES] + [pad])  # [-1]: empty
        self.color_ids = torch.tensor([word_id(tokenizer, c) for c in COLOR_NAMES] + [pad])
        self.prefix = tokenizer("USER: ", add_special_tokens=True)["input_ids"]

    def batch(self, items: list[_Item]) -> dict[str, torch.Tensor]:
        tok, pad = self.tok, self.tok.pad_token_id
        seqs, answer_len = [], []
        for it in items:
            answer = tok(" " + it.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(
                self.prefix + [pad] * SLOTS + tok(it.prompt, add_special_tokens=False)["input_ids"] + answer
            )
            answer_len.append(len(answer))
        ids = torch.full((len(seqs), max(map(len, seqs))), pad)
        labels = torch.full_like(ids, -100)
        for i, (seq, n) in enumerate(zip(seqs, answer_len)):
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(seq) - n : len(seq)] = torch.tensor(seq[-n:])
        slots = torch.zeros_like(ids, dtype=torch.bool)
        slots[:, len(self.prefix) : len(self.prefix) + SLOTS] = True
        first = torch.tensor([len(s) - n for s, n in zip(seqs, answer_len)])  # the answer's first token
        return {"ids": ids, "labels": labels, "slots": slots, "grid": torch.tensor([it.grid for it in items]),
                "first": first}  # fmt: skip

    def forward(
        self, b: dict[str, torch.Tensor], device: torch.device | None = None, labels: bool = True
    ) -> Any:
        device = device or self.lm.device
        b = {k: v.to(device) for k, v in b.items()}
        embed = self.lm.get_input_embeddings()
        x = embed(b["ids"]).clone()
        grid = b["grid"]
        shape_ids, color_ids = self.shape_ids.to(device), self.color_ids.to(device)
        objects = embed(shape_ids[grid[..., 0]]) + embed(color_ids[grid[..., 1]])
        x[b["slots"]] = (objects * (grid[..., :1] >= 0)).reshape(-1, x.shape[-1])
        mask = ((b["ids"] != self.tok.pad_token_id) | b["slots"]).long()
        return self.lm(inputs_embeds=x, attention_mask=mask, labels=b["labels"] if labels else None)

    @torch.no_grad()
    def accuracy(self, items: list[_Item], group: int) -> dict[str, float]:
        """First answer token right (greedy over the vocabulary); with ``group`` 4: all rotations right."""
        b = self.batch(items)
        logits = self.forward(b, labels=False).logits.cpu()
        rows = torch.arange(len(items))
        right = logits[rows, b["first"] - 1].argmax(-1) == b["ids"][rows, b["first"]]
        out = {"accuracy": round(float(right.float().mean()), 4)}
        if group > 1:
            out["circular"] = round(float(right.view(-1, group).all(1).float().mean()), 4)
        return out


def check_stage(stage: LMStage) -> None:
    """ValueError (one line, with the fix) for settings stage L cannot run."""
    for phase in stage.phases:
        unknown = sorted({*phase.weights, phase.goal} - {None, *TASKS})
        if unknown:
            raise ValueError(f"LMStage.phases names unknown tasks {unknown}; use tasks of {list(TASKS)}")
        if phase.max_steps < 1 or not phase.weights or min(phase.weights.values()) <= 0:
            raise ValueError(f"a stage-L phase needs max_steps >= 1 and positive task weights; got {phase}")
    if stage.batch_size < 1 or stage.lr <= 0 or stage.warmup < 1 or stage.val_items < 1:
        raise ValueError(
            "stage L needs batch_size, warmup and val_items >= 1 and lr > 0; got "
            f"batch_size={stage.batch_size}, warmup={stage.warmup}, val_items={stage.val_items}, "
            f"lr={stage.lr}"
        )


def draw(questions: _Questions, weights: dict[str, float], n: int, exclude: set) -> list[_Item]:
    """``n`` training questions, tasks drawn by ``weights``; a question whose key is in ``exclude`` (the
    held-out ones) is dropped, so held-out accuracies measure questions never trained on."""
    names = list(weights)
    p = np.array([weights[t] for t in names], dtype=float)
    items = [i for t in questions.rng.choice(names, n, p=p / p.sum()) for i in getattr(questions, t)()]
    return [i for i in items if i.key not in exclude]


def word_id(tokenizer: Any, word: str) -> int:
    """The single token of `` word`` (shape and colour names are one token in the suite's tokenizer)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(
            f"{word!r} is {len(ids)} tokens in this tokenizer, stage L needs one per shape and colour name; "
            "use the mini suite's tokenizer (`stgc data`)"
        )
    return ids[0]


def pretrain_language_model(
    size: str,
    tokenizer_dir: str | Path,
    out: str | Path,
    stage: LMStage = LMStage(),
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
    device: str | None = None,
) -> Path:
    """Train the llama language model of size ``size`` (module docstring) into ``out``: the weights
    (``LlamaForCausalLM.save_pretrained``), the tokenizer it was trained with, and ``lm_stage.json``."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from stgc.backbones import BACKBONES

    out = Path(out)
    check_stage(stage)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(stage.seed)
    rng = np.random.default_rng([stage.seed, 0x1A5])
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = BACKBONES["llama"].text_config(size, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    lm = LlamaForCausalLM(config).to(device)
    model, questions = _SlotLM(lm, tok), _Questions(rng)
    tasks = sorted({t for phase in stage.phases for t in (*phase.weights, phase.goal) if t}, key=TASKS.index)
    held_out = {
        t: [i for _ in range(stage.val_items) for i in getattr(questions, t)(rotations=True)] for t in tasks
    }
    seen = {i.key for items in held_out.values() for i in items}  # never trained on: held out for real

    def score(task: str) -> dict[str, float]:
        lm.eval()
        result = model.accuracy(held_out[task], 4 if task in CIRCULAR_TASKS else 1)
        lm.train()
        return result

    def goal_met(task: str, target: float) -> tuple[bool, dict[str, float]]:
        result = score(task)
        return result["circular" if task in CIRCULAR_TASKS else "accuracy"] >= target, result

    optimizer = torch.optim.AdamW(lm.parameters(), lr=stage.lr, weight_decay=0.0)
    t0, step, record = time.perf_counter(), 0, []
    lm.train()
    for k, phase in enumerate(stage.phases):
        reached, begin = None, step
        while step - begin < phase.max_steps and not reached:
            if phase.goal is None:  # a phase without a goal anneals
                lr = stage.lr * (1 - (step - begin) / phase.max_steps)
            else:
                lr = stage.lr * min(1.0, (step + 1) / stage.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            items = draw(questions, phase.weights, stage.batch_size, exclude=seen)
            loss = model.forward(model.batch(items), device).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
            optimizer.step()
            step += 1
            last = step - begin == phase.max_steps
            if phase.goal is not None and ((step - begin) % 100 == 0 or last):
                reached, result = goal_met(phase.goal, phase.target)
                if log is not None:
                    log(f"stage L phase {k + 1}: step {step}, loss {loss.item():.3f}, {phase.goal} {result}")
        record.append({"phase": k + 1, "steps": step - begin, "goal": phase.goal, "reached": reached})
        if log is not None:
            log(f"stage L phase {k + 1} ends at step {step}: {record[-1]}")
    lm.eval()
    accuracy = {t: score(t) for t in tasks}
    out.mkdir(parents=True, exist_ok=True)
    lm.cpu().save_pretrained(out)
    tok.save_pretrained(out)
    summary = {"size": size, **stage.to_json(), "phases_run": record, "held_out": accuracy,
               "seconds": round(time.perf_counter() - t0, 1), "device": str(device)}  # fmt: skip
    (out / STAGE_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return out


# ------------------------------------------------------------------------------------- into a LLaVA


def packaged_language_model(size: str) -> Path:
    """The stage-L language model that ships with stgc for ``size`` (``model.text_init=slot_pretrain``)."""
    folder = Path(__file__).parent / "assets" / f"{size}-lm"
    if not (folder / STAGE_FILE).exists():
        raise ValueError(
            f"model.text_init=slot_pretrain: no stage-L language model ships for size {size!r} (no "
            f"{folder}); make one with `stgc pretrain-lm --size {size} --out <folder>` and set "
            "model.text_init=<folder>."
        )
    return folder


def load_language_model(model: Any, folder: str | Path, tokenizer: Any) -> None:
    """Copy the causal LM saved in ``folder`` into ``model`` (a dense LLaVA built from scratch), after
    checking that it has the model's shape and was trained with ``tokenizer``'s vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ValueError(
            f"model.text_init={str(folder)!r} is neither scratch nor slot_pretrain nor a folder holding a "
            "causal language model (save_pretrained); use one of those."
        )
    if not (folder / "tokenizer.json").exists():
        raise ValueError(
            f"model.text_init={str(folder)!r} has no tokenizer.json beside the weights; save the tokenizer "
            "the language model was trained with into it (stgc pretrain-lm does)."
        )
    if AutoTokenizer.from_pretrained(str(folder)).get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"model.text_init={str(folder)!r} was trained with another tokenizer than the run's "
            "data.tokenizer; generate the suite with its default settings (`stgc data --out data/mini`) "
            "or use the language model's tokenizer folder as data.tokenizer."
        )
    have = AutoConfig.from_pretrained(str(folder))
    want = model.config.text_config
    mismatch = {k: (getattr(have, k, None), getattr(want, k, None)) for k in TEXT_SHAPE_KEYS}
    mismatch = {k: v for k, v in mismatch.items() if v[0] != v[1]}
    if mismatch:
        raise ValueError(
            f"model.text_init={str(folder)!r} is a language model of another architecture than the model's "
            f"(folder, model): {mismatch}; use one made for this backbone and size (`stgc pretrain-lm`)."
        )
    lm = AutoModelForCausalLM.from_pretrained(str(folder))
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())


def align_projector(
    model: Any,
    tokenizer: Any,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Fit the LLaVA projector so that each image token is what stage L put at that position: E[shape] +
    E[colour] of the object centred in the patch, zero elsewhere (squared error, tower and language model
    untouched; freshly drawn shape scenes, ``stgc.vision_stage.scene_batch``). Returns held-out figures:
    the squared error relative to the targets' before and after, and the shape / colour accuracy of the
    nearest (shape, colour) vector on object patches."""
    from stgc.data.render import COLOR_NAMES, SHAPES
    from stgc.modeling import build_image_processor
    from stgc.vision_stage import scene_batch

    vision = model.config.vision_config
    cells = vision.image_size // vision.patch_size
    if cells * cells != SLOTS:
        raise ValueError(
            f"model.projector_init=align needs a tower with {SLOTS} patches; this one has {cells**2}"
        )
    embed = model.get_input_embeddings().weight.detach()
    names = (
        torch.tensor([0] + [word_id(tokenizer, s) for s in SHAPES]),
        torch.tensor([0] + [word_id(tokenizer, c) for c in COLOR_NAMES]),
    )
    pairs = (embed[names[0][1:], None] + embed[None, names[1][1:]]).flatten(0, 1)

    def target(labels: dict[str, torch.Tensor]) -> torch.Tensor:
        on = (labels["shape"] > 0)[..., None]
        return (embed[names[0][labels["shape"]]] + embed[names[1][labels["color"]]]) * on

    pixels = build_image_processor(vision.image_size)
    projector = model.model.multi_modal_projector

    def features(images: list) -> torch.Tensor:
        with torch.no_grad():
            return patch_features(model, pixels(images, return_tensors="pt")["pixel_values"])

    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 0xA11])
    val_images, val_labels = scene_batch(rng, 300, cells, 224, grids=(3,))  # 3 x 3: one object per patch
    val_features = features(val_images)

    def error() -> float:  # held-out squared error relative to the targets' (0: perfect)
        with torch.no_grad():
            goal = target(val_labels)
            return round(float((projector(val_features) - goal).pow(2).sum() / goal.pow(2).sum()), 4)

    before = error()
    optimizer = torch.optim.AdamW(projector.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        images, labels = scene_batch(rng, batch_size, cells, 224, grids=(3,))
        loss = (projector(features(images)) - target(labels)).pow(2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if log is not None and (step + 1) % 100 == 0:
            log(f"projector alignment: step {step + 1}/{steps}, loss {loss.item():.4f}")
    with torch.no_grad():
        tokens = projector(val_features)
        nearest = torch.cdist(tokens.flatten(0, 1), pairs).argmin(-1).view(tokens.shape[:2])
        on = val_labels["shape"] > 0
        n_colors = len(COLOR_NAMES)
        return {
            "relative_error_before": before,
            "relative_error": error(),
            "shape_accuracy": round(
                float((nearest // n_colors + 1 == val_labels["shape"])[on].float().mean()), 4
            ),
            "color_accuracy": round(
                float((nearest % n_colors + 1 == val_labels["color"])[on].float().mean()), 4
            ),
        }


def patch_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision features a LLaVA hands its projector (its ``vision_feature_layer`` and
    ``vision_feature_select_strategy``, as ``LlavaModel.get_image_features`` selects them)."""
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer!r}: align_projector reads one layer; use an int")
    hidden = model.model.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[
        layer
    ]
    return hidden[:, 1:] if model.config.vision_feature_select_strategy == "default" else hidden
