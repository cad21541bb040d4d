"""ChartQA: vertical bar, horizontal bar and line charts with every value printed next to its mark, so each
numeric answer is recoverable from the pixels. Lookup questions go to ``augmented_test``, questions that
need arithmetic or comparison to ``human_test`` (the harder split of the real dataset). Answers are strings
("42", "3.5", "Spain"); lmms-eval's relaxed accuracy accepts numbers within 5%."""

from __future__ import annotations

import numpy as np
from datasets import Features, Image, Value
from PIL import ImageDraw

from stgc.data.common import Unit, fmt_number
from stgc.data.render import COLOR_NAMES, background, fit_font, font_px, jitter_color, text_box, text_width
from stgc.data.vocab import CHART_CATEGORIES, CHART_TOPICS, YEARS

CHARTQA_FEATURES = Features(
    {"type": Value("string"), "question": Value("string"), "answer": Value("string"), "image": Image()}
)


def _values(rng: np.random.Generator, n: int, decimals: bool) -> list[float]:
    while True:  # distinct values, so "highest" / "lowest" have one answer
        raw = rng.integers(50, 950, size=n) / 10 if decimals else rng.integers(5, 96, size=n).astype(float)
        vals = [float(v) for v in raw]
        if len(set(vals)) == n:
            return vals


def _vbar(draw, rng, size, labels, values, color):
    top, bottom, left, right = size * 0.2, size * 0.84, size * 0.06, size * 0.96
    draw.line((left, bottom, right, bottom), fill=(60, 60, 60), width=1)
    slot = (right - left) / len(labels)
    fs = fit_font(font_px(size, 0.05, minimum=9), [*labels, *map(fmt_number, values)], slot * 0.95)
    vmax = max(values) * 1.1
    for i, (lab, v) in enumerate(zip(labels, values)):
        x0 = left + i * slot + slot * 0.18
        x1 = left + (i + 1) * slot - slot * 0.18
        y = bottom - (bottom - top) * v / vmax
        draw.rectangle((x0, y, x1, bottom), fill=color)
        text_box(draw, ((x0 + x1) / 2, y - 2), fmt_number(v), fs, anchor="md")
        text_box(draw, ((x0 + x1) / 2, bottom + 3), lab, fs, fill=(40, 40, 40), anchor="ma")


def _hbar(draw, rng, size, labels, values, color):
    fs = fit_font(font_px(size, 0.05, minimum=9), labels, size * 0.28)
    label_w = max(text_width(lab, fs) for lab in labels)
    left, right = size * 0.05 + label_w + 4, size * 0.84
    top, bottom = size * 0.18, size * 0.96
    slot = (bottom - top) / len(labels)
    vmax = max(values)
    draw.line((left, top, left, bottom), fill=(60, 60, 60), width=1)
    for i, (lab, v) in enumerate(zip(labels, values)):
        y0 = top + i * slot + slot * 0.15
        y1 = top + (i + 1) * slot - slot * 0.15
        x = left + (right - left) * v / vmax
        draw.rectangle((left, y0, x, y1), fill=color)
        text_box(draw, (left - 4, (y0 + y1) / 2), lab, fs, fill=(40, 40, 40), anchor="rm")
        text_box(draw, (x + 3, (y0 + y1) / 2), fmt_number(v), fs, anchor="lm")


def _line(draw, rng, size, labels, values, color):
    top, bottom, left, right = size * 0.24, size * 0.84, size * 0.1, size * 0.9
    spacing = (right - left) / (len(values) - 1)
    fs = fit_font(font_px(size, 0.05, minimum=9), [*labels, *map(fmt_number, values)], spacing * 0.95)
    axis = bottom + size * 0.02
    bottom -= size * 0.09  # room for a label below the lowest point
    vmin, vmax = min(values), max(values)
    span = (vmax - vmin) or 1.0
    draw.line((left - size * 0.04, axis, right + size * 0.04, axis), fill=(60, 60, 60))
    pts = []
    for i, v in enumerate(values):
        x = left + (right - left) * i / (len(values) - 1)
        y = bottom - (bottom - top) * (v - vmin) / span
        pts.append((x, y))
    draw.line(pts, fill=color, width=max(2, size // 100))
    r = max(2, size // 75)
    for i, ((x, y), v, lab) in enumerate(zip(pts, values, labels)):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
        # put the value label where the line is not: below a dip, above-left of a rise, above-right of a fall
        prev = values[i - 1] if i > 0 else None
        nxt = values[i + 1] if i + 1 < len(values) else None
        neighbours = [w for w in (prev, nxt) if w is not None]
        if sum(neighbours) / len(neighbours) > v and not (
            prev is not None and nxt is not None and prev < v < nxt
        ):
            text_box(draw, (x, y + r + 2), fmt_number(v), fs, anchor="ma")
        elif prev is not None and nxt is not None and prev < v < nxt:
            text_box(draw, (x - r, y - r), fmt_number(v), fs, anchor="rd")
        elif prev is not None and nxt is not None and prev > v > nxt:
            text_box(draw, (x + r, y - r), fmt_number(v), fs, anchor="ld")
        else:
            text_box(draw, (x, y - r - 2), fmt_number(v), fs, anchor="md")
        text_box(draw, (x, axis + size * 0.02), lab, fs, fill=(40, 40, 40), anchor="ma")


def make_chartqa(rng: np.random.Generator, unit: int, size: int) -> Unit:
    kind = ("vbar", "hbar", "line")[unit % 3]
    decimals = rng.random() < 0.3
    if kind == "line":
        n = int(rng.integers(4, 7))
        start = int(rng.integers(0, len(YEARS) - n + 1))
        labels = list(YEARS[start : start + n])
    else:
        n = int(rng.integers(3, 5 if kind == "vbar" else 7))
        group = CHART_CATEGORIES[int(rng.integers(len(CHART_CATEGORIES)))]
        labels = [str(x) for x in rng.choice(group, size=n, replace=False)]
    values = _values(rng, n, decimals)
    topic = str(rng.choice(CHART_TOPICS))
    img = background(rng, size)
    draw = ImageDraw.Draw(img)
    text_box(
        draw,
        (size / 2, size * 0.03),
        topic,
        fit_font(font_px(size, 0.058), [topic], size * 0.94),
        anchor="ma",
    )
    color = jitter_color(rng, str(rng.choice([c for c in COLOR_NAMES if c not in ("yellow", "pink")])))
    {"vbar": _vbar, "hbar": _hbar, "line": _line}[kind](draw, rng, size, labels, values, color)

    where = "in" if kind == "line" else "of"
    i, j = (int(x) for x in rng.choice(n, size=2, replace=False))
    lookup = [(f"What is the value {where} {labels[i]}?", fmt_number(values[i]))]
    reasoning = [
        (
            f"What is the difference between {labels[i]} and {labels[j]}?",
            fmt_number(abs(values[i] - values[j])),
        ),
        (f"What is the sum of {labels[i]} and {labels[j]}?", fmt_number(values[i] + values[j])),
        ("What is the highest value in the chart?", fmt_number(max(values))),
    ]
    if kind == "line":
        reasoning.append(("What is the average of all the values?", fmt_number(round(sum(values) / n, 1))))
    else:
        reasoning.append(("Which category has the highest value?", labels[int(np.argmax(values))]))
        reasoning.append(("Which category has the lowest value?", labels[int(np.argmin(values))]))
    q_lookup = lookup[0]
    q_reason = reasoning[int(rng.integers(len(reasoning)))]
    picked = [("augmented_test", *q_lookup), ("human_test", *q_reason)]
    if rng.random() < 0.5:
        picked = [picked[int(rng.integers(2))]]
    rows = [{"type": t, "question": q, "answer": a} for t, q, a in picked]
    caption = (
        f"A {'line' if kind == 'line' else 'bar'} chart of {topic}: "
        + ", ".join(f"{lab} {fmt_number(v)}" for lab, v in zip(labels, values))
        + "."
    )
    return Unit(img, rows, caption=caption)
