"""Photo-like benchmarks: TextVQA (words on signs, OCR questions, 10 answers + OCR tokens) and VizWiz
(single-subject "photos" of which some are blurred, dark or framed off-target, answered 'unanswerable')."""

from __future__ import annotations

import numpy as np
from datasets import Features, Image, List, Value
from PIL import ImageDraw

from stgc.data.common import Unit, annotator_answers
from stgc.data.render import (
    COLOR_NAMES,
    SHAPES,
    background,
    contrast_text,
    degrade,
    draw_scene,
    draw_shape,
    fit_font,
    font_px,
    jitter_color,
    sample_scene,
    text_box,
    text_width,
)
from stgc.data.vocab import BRANDS, SIGN_WORDS

# ------------------------------------------------------------------------------------------- TextVQA

TEXTVQA_FEATURES = Features(
    {
        "image_id": Value("string"),
        "question_id": Value("int64"),
        "question": Value("string"),
        "question_tokens": List(Value("string")),
        "image": Image(),
        "image_width": Value("int64"),
        "image_height": Value("int64"),
        "answers": List(Value("string")),
        "image_classes": List(Value("string")),
        "set_name": Value("string"),
        "ocr_tokens": List(Value("string")),
    }
)
_SIGN_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")


def make_textvqa(rng: np.random.Generator, unit: int, size: int) -> Unit:
    n = int(rng.integers(1, 4))
    colors = [str(c) for c in rng.choice(_SIGN_COLORS, size=n, replace=False)]
    kinds = ["word"] * n
    kinds[int(rng.integers(n))] = str(rng.choice(["word", "number", "brand"]))
    img = background(rng, size)
    draw = ImageDraw.Draw(img)
    band = size / n
    signs = []  # (colour, kind, shown text, answer)
    for i, (color, kind) in enumerate(zip(colors, kinds)):
        if kind == "number":
            shown = str(int(rng.integers(10, 1000)))
        elif kind == "brand":
            shown = str(rng.choice(BRANDS))
        else:
            w = str(rng.choice(SIGN_WORDS))
            shown = w.upper() if rng.random() < 0.5 else w.capitalize()
        fs = fit_font(font_px(size, 0.09), [shown], size * 0.8)
        fs = min(fs, int(band / 1.9))  # a sign's box (1.8 x font) must fit in its band
        tw = text_width(shown, fs)
        box_w, box_h = tw + fs * 1.2, fs * 1.8
        x0 = float(rng.uniform(size * 0.04, max(size * 0.04, size * 0.96 - box_w)))
        y0 = i * band + float(rng.uniform(0, max(0.0, band - box_h)))
        fill = jitter_color(rng, color)
        draw.rectangle((x0, y0, x0 + box_w, y0 + box_h), fill=fill, outline=(40, 40, 40))
        text_box(draw, (x0 + box_w / 2, y0 + box_h / 2), shown, fs, fill=contrast_text(fill), anchor="mm")
        signs.append((color, kind, shown, shown.lower()))

    options = []
    for color, kind, _, answer in signs:
        if kind == "number":
            options.append(
                (
                    "what is the number on the sign?" if n == 1 else f"what number is on the {color} sign?",
                    answer,
                )
            )
        elif kind == "brand":
            options.append(("what brand name is shown?", answer))
        else:
            options.append((f"what is written on the {color} sign?", answer))
    if n == 1 and signs[0][1] == "word":
        options.append(("what does the sign say?", signs[0][3]))
    if n >= 2:
        options.append(("what is written at the top?", signs[0][3]))
    picks = rng.permutation(len(options))[: int(rng.integers(1, 3))]
    ocr_tokens = [s[2] for s in signs]  # reading order, top to bottom, case as printed
    rows = []
    for k, p in enumerate(picks):
        q, a = options[int(p)]
        rows.append(
            {
                "image_id": f"{unit:016x}",
                "question_id": unit * 10 + k,
                "question": q,
                "question_tokens": q.rstrip("?").split(),
                "image_width": size,
                "image_height": size,
                "answers": annotator_answers(rng, a, [s[3] for s in signs]),
                "image_classes": ["Sign"],
                "set_name": "val",
                "ocr_tokens": ocr_tokens,
            }
        )
    caption = "Signs reading " + ", ".join(f'"{s[2]}"' for s in signs) + "."
    return Unit(img, rows, caption=caption)


# -------------------------------------------------------------------------------------------- VizWiz

VIZWIZ_FEATURES = Features(
    {
        "question_id": Value("string"),
        "image": Image(),
        "question": Value("string"),
        "answers": List(Value("string")),
        "category": Value("string"),
    }
)
UNANSWERABLE = "unanswerable"


def _photo(rng: np.random.Generator, size: int) -> tuple:
    """A single-subject photo with its content kept inside the central 70% (corners stay empty, so the
    'crop' degradation is guaranteed to lose the subject)."""
    kind = str(rng.choice(["object", "label", "count"]))
    img = background(rng, size)
    draw = ImageDraw.Draw(img)
    if kind == "object":
        shape, color = str(rng.choice(SHAPES)), str(rng.choice(COLOR_NAMES))
        c = size / 2 + float(rng.uniform(-0.06, 0.06)) * size
        draw_shape(draw, shape, c, c, size * float(rng.uniform(0.22, 0.3)), jitter_color(rng, color))
        if rng.random() < 0.5:
            return img, "what color is this?", color, list(COLOR_NAMES), "other", kind
        return img, "what shape is this?", shape, list(SHAPES), "other", kind
    if kind == "label":
        word = str(rng.choice(SIGN_WORDS))
        fill = jitter_color(rng, str(rng.choice(["yellow", "green", "blue", "pink", "orange"])))
        y = size * float(rng.uniform(0.3, 0.5))
        draw.rectangle((size * 0.15, y, size * 0.85, y + size * 0.22), fill=fill, outline=(40, 40, 40))
        text_box(
            draw,
            (size / 2, y + size * 0.11),
            word.upper(),
            fit_font(font_px(size, 0.1), [word.upper()], size * 0.64),
            contrast_text(fill),
            anchor="mm",
        )
        q = str(rng.choice(["what is written on this label?", "what does this say?"]))
        return img, q, word, list(SIGN_WORDS[:10]), "other", kind
    n = int(rng.integers(1, 6))
    shape, color = str(rng.choice(SHAPES)), str(rng.choice(COLOR_NAMES))
    inner = int(size * 0.7)
    scene = sample_scene(rng, inner, [shape] * n, [color] * n)
    patch = draw_scene(rng, scene, inner)
    img.paste(patch, ((size - inner) // 2, (size - inner) // 2))
    return img, "how many items are there?", str(n), [str(n - 1), str(n + 1)], "number", kind


def make_vizwiz(rng: np.random.Generator, unit: int, size: int) -> Unit:
    img, question, gold, alts, category, kind = _photo(rng, size)
    if rng.random() < 0.35:
        # Colour and shape survive a blur, so blur only degrades text; darkness and cropping hide anything.
        how = str(rng.choice(["blur", "dark", "crop"] if kind == "label" else ["dark", "crop"]))
        img = degrade(rng, img, how)
        answers = annotator_answers(rng, UNANSWERABLE, ["unsuitable"])
        category, caption = UNANSWERABLE, ""
    else:
        answers = annotator_answers(rng, gold, alts)
        caption = ""
    row = {
        "question_id": f"VizWiz_val_{unit:08d}.jpg",
        "question": question,
        "answers": answers,
        "category": category,
    }
    return Unit(img, [row], caption=caption)
