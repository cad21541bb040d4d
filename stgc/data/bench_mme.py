"""MME: exactly two yes/no questions per image (one "Yes", one "No"), sharing a ``question_id``, over
perception categories (existence, count, position, color, OCR) and cognition categories
(numerical_calculation, code_reasoning). Category names are MME's own, so lmms-eval's perception /
cognition aggregation (``mme_aggregate_results``: acc + acc+ per category, summed) applies unchanged."""

from __future__ import annotations

import numpy as np
from datasets import Features, Image, Value
from PIL import ImageDraw

from stgc.data.common import MME_SUFFIX, Unit
from stgc.data.render import (
    COLOR_NAMES,
    PLURALS,
    SHAPES,
    background,
    contrast_text,
    draw_scene,
    draw_shape,
    fit_font,
    font_px,
    jitter_color,
    sample_scene,
    text_box,
)
from stgc.data.scenes import NUMBER_WORDS, sample_shapes
from stgc.data.vocab import SIGN_WORDS

MME_FEATURES = Features(
    {
        "question_id": Value("string"),
        "image": Image(),
        "question": Value("string"),
        "answer": Value("string"),
        "category": Value("string"),
    }
)
MME_CATEGORIES = (
    "existence",
    "count",
    "position",
    "color",
    "OCR",
    "numerical_calculation",
    "code_reasoning",
)


def _pick(rng: np.random.Generator, items: list) -> object:
    return items[int(rng.integers(len(items)))]


def _existence(rng, size):
    shapes = sample_shapes(rng, int(rng.integers(2, 5)))
    colors = [str(_pick(rng, list(COLOR_NAMES))) for _ in shapes]
    img = draw_scene(rng, sample_scene(rng, size, shapes, colors), size)
    absent = str(_pick(rng, [s for s in SHAPES if s not in shapes]))
    yes = f"Is there a {_pick(rng, shapes)} in this image?"
    return img, yes, f"Is there a {absent} in this image?"


def _count(rng, size):
    shape, color = str(_pick(rng, list(SHAPES))), str(_pick(rng, list(COLOR_NAMES)))
    n = int(rng.integers(1, 6))
    img = draw_scene(rng, sample_scene(rng, size, [shape] * n, [color] * n), size)
    wrong = int(_pick(rng, [k for k in (n - 1, n + 1, n + 2) if k >= 1 and k != n]))
    noun = lambda k: shape if k == 1 else PLURALS[shape]  # noqa: E731
    verb = lambda k: "Is there" if k == 1 else "Are there"  # noqa: E731
    yes = f"{verb(n)} {NUMBER_WORDS[n]} {noun(n)} in this image?"
    return img, yes, f"{verb(wrong)} {NUMBER_WORDS[wrong]} {noun(wrong)} in this image?"


def _position(rng, size):
    while True:
        shapes = sample_shapes(rng, 2)
        colors = [str(c) for c in rng.choice(COLOR_NAMES, size=2, replace=False)]
        scene = sample_scene(rng, size, shapes, colors)
        a, b = scene.objects
        if a.col != b.col:
            break
    img = draw_scene(rng, scene, size)
    left, right = (a, b) if a.col < b.col else (b, a)
    yes = f"Is the {left.name} on the left of the {right.name}?"
    return img, yes, f"Is the {right.name} on the left of the {left.name}?"


def _color(rng, size):
    shapes = sample_shapes(rng, int(rng.integers(1, 4)))
    colors = [str(c) for c in rng.choice(COLOR_NAMES, size=len(shapes), replace=False)]
    img = draw_scene(rng, sample_scene(rng, size, shapes, colors), size)
    k = int(rng.integers(len(shapes)))
    wrong = str(_pick(rng, [c for c in COLOR_NAMES if c != colors[k]]))
    return img, f"Is the {shapes[k]} {colors[k]}?", f"Is the {shapes[k]} {wrong}?"


def _sign(rng, size, lines: list[str], frac: float, mono_left: bool = False):
    img = background(rng, size)
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.5:  # a small decorative shape so OCR images are not all alike
        draw_shape(draw, str(_pick(rng, list(SHAPES))), size * 0.12, size * 0.12, size * 0.06,
                   jitter_color(rng, str(_pick(rng, list(COLOR_NAMES)))))  # fmt: skip
    fs = fit_font(font_px(size, frac), lines, size * 0.72)
    box = jitter_color(rng, str(_pick(rng, ["yellow", "pink", "orange", "green", "blue"])))
    h = fs * 1.5
    y0 = size / 2 - h * len(lines) / 2 + float(rng.uniform(-0.05, 0.05)) * size
    draw.rectangle((size * 0.08, y0 - fs * 0.4, size * 0.92, y0 + h * len(lines) + fs * 0.1), fill=box)
    for i, line in enumerate(lines):
        x, anchor = (size * 0.14, "la") if mono_left else (size / 2, "ma")
        text_box(draw, (x, y0 + i * h), line, fs, fill=contrast_text(box), anchor=anchor)
    return img


def _ocr(rng, size):
    word, other = (str(w) for w in rng.choice(SIGN_WORDS, size=2, replace=False))
    img = _sign(rng, size, [word.upper() if rng.random() < 0.5 else word.capitalize()], 0.13)
    return img, f'Is the word in the image "{word}"?', f'Is the word in the image "{other}"?'


def _numerical(rng, size):
    a, b = int(rng.integers(2, 30)), int(rng.integers(2, 30))
    op = str(_pick(rng, ["+", "-", "*"]))
    value = a + b if op == "+" else a - b if op == "-" else a * b
    shown = "x" if op == "*" else op
    img = _sign(rng, size, [f"{a} {shown} {b} = ?"], 0.12)
    wrong = value + int(_pick(rng, [-10, -2, -1, 1, 2, 10]))
    q = "Is the answer to the arithmetic question in the image {}?"
    return img, q.format(value), q.format(wrong)


def _code(rng, size):
    a, b = int(rng.integers(2, 12)), int(rng.integers(2, 12))
    op = str(_pick(rng, ["+", "*", "-"]))
    value = a + b if op == "+" else a * b if op == "*" else a - b
    lines = [f"a = {a}", f"b = {b}", f"print(a {op} b)"]
    img = _sign(rng, size, lines, 0.095, mono_left=True)
    wrong = value + int(_pick(rng, [-3, -1, 1, 2, 4]))
    q = "Is the output of the python code in the image {}?"
    return img, q.format(value), q.format(wrong)


_MAKERS = {
    "existence": _existence,
    "count": _count,
    "position": _position,
    "color": _color,
    "OCR": _ocr,
    "numerical_calculation": _numerical,
    "code_reasoning": _code,
}


def make_mme(rng: np.random.Generator, unit: int, size: int) -> Unit:
    category = MME_CATEGORIES[unit % len(MME_CATEGORIES)]
    img, yes_q, no_q = _MAKERS[category](rng, size)
    qid = f"{category}/{unit:05d}.png"
    rows = [
        {"question_id": qid, "question": yes_q + MME_SUFFIX, "answer": "Yes", "category": category},
        {"question_id": qid, "question": no_q + MME_SUFFIX, "answer": "No", "category": category},
    ]
    if rng.random() < 0.5:
        rows.reverse()
    return Unit(img, rows)
