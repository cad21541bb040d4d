"""Multiple-choice benchmarks: ScienceQA-IMG (context hint + choices, integer answer) and MMBench (A-D
options, every question present in all four circular rotations).

MMBench's circular evaluation (lmms-eval ``MMBench_Evaluator.eval_result``) groups rows by
``index % 1_000_000``: the row with index < 1e6 is the main one, ``index + r * 1e6`` its r-th rotation, and
a question counts as solved only if every rotation is answered correctly. A constant answer ("A")
therefore scores 0 here, as it would on the real dev set.
"""

from __future__ import annotations

import numpy as np
from datasets import Features, Image, List, Value
from PIL import ImageDraw

from stgc.data.common import Unit
from stgc.data.render import (
    COLOR_NAMES,
    SIDES,
    background,
    contrast_text,
    draw_scene,
    fit_font,
    font_px,
    jitter_color,
    sample_scene,
    text_box,
)
from stgc.data.scenes import sample_shapes
from stgc.data.vocab import SIGN_WORDS

CIRCULAR_STRIDE = 1_000_000  # lmms-eval's grouping key: index % 1e6

# ------------------------------------------------------------------------------------------ ScienceQA

SCIENCEQA_FEATURES = Features(
    {
        "image": Image(),
        "question": Value("string"),
        "choices": List(Value("string")),
        "answer": Value("int8"),
        "hint": Value("string"),
        "task": Value("string"),
        "grade": Value("string"),
        "subject": Value("string"),
        "topic": Value("string"),
        "category": Value("string"),
        "skill": Value("string"),
        "lecture": Value("string"),
        "solution": Value("string"),
    }
)


def _magnets(rng: np.random.Generator, size: int) -> tuple:
    """Two bar magnets side by side; facing poles decide attract / repel (a classic ScienceQA item)."""
    img = background(rng, size)
    draw = ImageDraw.Draw(img)
    poles = [("N", "S") if rng.random() < 0.5 else ("S", "N") for _ in range(2)]
    fs = font_px(size, 0.1)
    w, h, y = size * 0.2, size * 0.16, size * 0.42 + float(rng.uniform(-0.1, 0.1)) * size
    x = size * 0.06
    for left, right in poles:
        for k, pole in enumerate((left, right)):
            fill = jitter_color(rng, "red" if pole == "N" else "blue")
            x0 = x + k * w
            draw.rectangle((x0, y, x0 + w, y + h), fill=fill, outline=(30, 30, 30))
            text_box(draw, (x0 + w / 2, y + h / 2), pole, fs, fill=(250, 250, 250), anchor="mm")
        x += 2 * w + size * 0.08
    attract = poles[0][1] != poles[1][0]
    choices = ["attract", "repel"] if rng.random() < 0.5 else ["repel", "attract"]
    answer = choices.index("attract" if attract else "repel")
    hint = (
        "Two magnets are placed as shown.\n\nHint: Magnets that attract pull together. "
        "Magnets that repel push apart."
    )
    solution = (
        f"The facing poles are {poles[0][1]} and {poles[1][0]}. "
        f"{'Opposite poles attract.' if attract else 'Like poles repel.'}"
    )
    meta = (
        "Will these magnets attract or repel each other?",
        "physics",
        "Magnets",
        "Predict magnetic forces",
    )
    return img, choices, answer, hint, solution, meta


def _material(rng: np.random.Generator, size: int) -> tuple:
    """The hint tells which colour is which material; the image tells which shape has that colour."""
    shapes = sample_shapes(rng, 3)
    colors = [str(c) for c in rng.choice(COLOR_NAMES, size=3, replace=False)]
    img = draw_scene(rng, sample_scene(rng, size, shapes, colors, grid=3), size)
    material = str(rng.choice(MATERIALS))
    k = int(rng.integers(3))
    question, hint = material_question(material, colors[k])
    choices = [f"the {s}" for s in shapes]
    solution = f"The {colors[k]} object is the {shapes[k]}, so the {shapes[k]} is made of {material}."
    meta = (question, "physics", "Materials", "Identify materials")
    return img, choices, k, hint, solution, meta


MATERIALS = ("metal", "wood", "glass", "rubber")


def material_question(material: str, color: str) -> tuple[str, str]:
    """(question, hint) of the materials item; the hint names the colour of the object of ``material``."""
    other = sorted(set(MATERIALS) - {material})[0]
    hint = (
        f"In this picture, the {color} object is made of {material}. The other objects are made of {other}."
    )
    return f"Which object is made of {material}?", hint


def _sides(rng: np.random.Generator, size: int) -> tuple:
    polys = [str(s) for s in rng.choice(["triangle", "square", "pentagon", "hexagon"], size=3, replace=False)]
    colors = [str(c) for c in rng.choice(COLOR_NAMES, size=3, replace=False)]
    img = draw_scene(rng, sample_scene(rng, size, polys, colors), size)
    most = max(polys, key=lambda s: SIDES[s])
    choices = [f"the {c} shape" for c in colors]
    solution = f"The {most} has {SIDES[most]} sides, more than the other shapes."
    meta = ("Which shape has the most sides?", "geometry", "Shapes", "Count sides of polygons")
    return img, choices, polys.index(most), "", solution, meta


def make_scienceqa_img(rng: np.random.Generator, unit: int, size: int) -> Unit:
    maker = (_magnets, _material, _sides)[unit % 3]
    img, choices, answer, hint, solution, (question, topic, category, skill) = maker(rng, size)
    row = {
        "question": question,
        "choices": choices,
        "answer": int(answer),
        "hint": hint,
        "task": "closed choice",
        "grade": f"grade{int(rng.integers(2, 9))}",
        "subject": "natural science",
        "topic": topic,
        "category": category,
        "skill": skill,
        "lecture": "",
        "solution": solution,
    }
    return Unit(img, [row])


# ------------------------------------------------------------------------------------------- MMBench

MMBENCH_FEATURES = Features(
    {
        "index": Value("int64"),
        "question": Value("string"),
        "hint": Value("string"),
        "A": Value("string"),
        "B": Value("string"),
        "C": Value("string"),
        "D": Value("string"),
        "answer": Value("string"),
        "category": Value("string"),
        "image": Image(),
        "source": Value("string"),
        "L2-category": Value("string"),
        "comment": Value("string"),
        "split": Value("string"),
    }
)
# MMBench's own category -> L2-category names
MMBENCH_CATEGORIES: dict[str, str] = {
    "attribute_recognition": "finegrained_perception (instance-level)",
    "object_localization": "finegrained_perception (instance-level)",
    "ocr": "finegrained_perception (instance-level)",
    "spatial_relationship": "relation_reasoning",
    "attribute_comparison": "finegrained_perception (cross-instance)",
}
_CORNERS = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}


def _mc_attribute(rng, size):
    shapes = sample_shapes(rng, int(rng.integers(2, 5)))
    colors = [str(c) for c in rng.choice(COLOR_NAMES, size=len(shapes), replace=False)]
    img = draw_scene(rng, sample_scene(rng, size, shapes, colors), size)
    k = int(rng.integers(len(shapes)))
    wrong = [str(c) for c in rng.choice([c for c in COLOR_NAMES if c != colors[k]], size=3, replace=False)]
    return img, f"What color is the {shapes[k]}?", colors[k], wrong, "nan"


def _mc_localization(rng, size):
    shapes = sample_shapes(rng, int(rng.integers(1, 4)))
    colors = [str(c) for c in rng.choice(COLOR_NAMES, size=len(shapes), replace=False)]
    scene = sample_scene(rng, size, shapes, colors, grid=2)
    img = draw_scene(rng, scene, size)
    obj = scene.objects[int(rng.integers(len(shapes)))]
    gold = _CORNERS[(obj.row, obj.col)]
    hint = "The image is divided into four equal quarters." if rng.random() < 0.5 else "nan"
    return img, f"Where is the {obj.name} located?", gold, [c for c in _CORNERS.values() if c != gold], hint


def _mc_spatial(rng, size):
    while True:
        scene = sample_scene(
            rng, size, sample_shapes(rng, 4), [str(c) for c in rng.choice(COLOR_NAMES, size=4, replace=False)]
        )
        for target in scene.objects:
            lefts = [o for o in scene.objects if o.col < target.col]
            if len(lefts) == 1:
                break
        else:
            continue
        break
    img = draw_scene(rng, scene, size)
    gold = lefts[0].name
    distract = [o.name for o in scene.objects if o is not lefts[0] and o is not target]
    while len(distract) < 3:
        distract.append(f"{rng.choice(COLOR_NAMES)} {rng.choice(['heart', 'arrow', 'cross'])}")
        distract = list(dict.fromkeys(d for d in distract if d != gold))
    return img, f"Which object is to the left of the {target.name}?", gold, distract[:3], "nan"


def _mc_ocr(rng, size):
    words = [str(w) for w in rng.choice(SIGN_WORDS, size=4, replace=False)]
    img = background(rng, size)
    draw = ImageDraw.Draw(img)
    box = jitter_color(rng, str(rng.choice(["yellow", "green", "blue", "orange"])))
    y = size * float(rng.uniform(0.3, 0.6))
    draw.rectangle((size * 0.1, y, size * 0.9, y + size * 0.22), fill=box)
    text_box(
        draw,
        (size / 2, y + size * 0.11),
        words[0].upper(),
        fit_font(font_px(size, 0.12), [words[0].upper()], size * 0.76),
        contrast_text(box),
        anchor="mm",
    )
    hint = "The sign hangs above a shop door." if rng.random() < 0.5 else "nan"
    return img, "What word is written on the sign?", words[0], words[1:], hint


def _mc_comparison(rng, size):
    shapes = sample_shapes(rng, 3)
    colors = [str(c) for c in rng.choice(COLOR_NAMES, size=3, replace=False)]
    big = int(rng.integers(3))
    scales = [(0.8, 0.9) if k == big else (0.3, 0.4) for k in range(3)]
    scene = sample_scene(rng, size, shapes, colors, scale=scales)
    o = scene.objects[big]
    img = draw_scene(rng, scene, size)
    gold = f"the {o.shape}"
    wrong = [f"the {s}" for s in shapes if s != o.shape] + ["they are the same size"]
    return img, "Which object is the largest?", gold, wrong, "nan"


_MC_MAKERS = {
    "attribute_recognition": _mc_attribute,
    "object_localization": _mc_localization,
    "ocr": _mc_ocr,
    "spatial_relationship": _mc_spatial,
    "attribute_comparison": _mc_comparison,
}


def circular_rotations(options: list[str]) -> list[list[str]]:
    """MMBench's circular evaluation: the options in each rotation (rotation r starts at option r)."""
    return [options[r:] + options[:r] for r in range(len(options))]


def make_mmbench(rng: np.random.Generator, unit: int, size: int) -> Unit:
    """One question in its four circular rotations (indices unit + r * 1e6, r = 0..3)."""
    if unit >= CIRCULAR_STRIDE:
        raise ValueError(f"MMBench mini suite holds at most {CIRCULAR_STRIDE} questions; got unit {unit}")
    category = list(_MC_MAKERS)[unit % len(_MC_MAKERS)]
    img, question, gold, wrong, hint = _MC_MAKERS[category](rng, size)
    options = [gold, *wrong[:3]]
    options = [options[i] for i in rng.permutation(4)]
    rows = []
    for r, rotated in enumerate(circular_rotations(options)):
        rows.append(
            {
                "index": unit + r * CIRCULAR_STRIDE,
                "question": question,
                "hint": hint,
                **{letter: opt for letter, opt in zip("ABCD", rotated)},
                "answer": "ABCD"[rotated.index(gold)],
                "category": category,
                "source": "stgc_mini",
                "L2-category": MMBENCH_CATEGORIES[category],
                "comment": "nan",
                "split": "dev",
            }
        )
    return Unit(img, rows)
