"""DocVQA: rendered invoices and forms made of key-value lines. Answers are copied spans of the page
("Mary Smith", "03/12/2019", "$23.10"), with the accepted variants the real annotators give (with and
without the currency sign), scored by ANLS."""

from __future__ import annotations

import numpy as np
from datasets import Features, Image, List, Value
from PIL import Image as PILImage
from PIL import ImageDraw

from stgc.data.common import Unit
from stgc.data.render import fit_font, font_px, text_box
from stgc.data.vocab import CITIES, COMPANIES, FIRST_NAMES, ITEMS, LAST_NAMES

DOCVQA_FEATURES = Features(
    {
        "questionId": Value("string"),
        "question": Value("string"),
        "question_types": List(Value("string")),
        "image": Image(),
        "docId": Value("int64"),
        "ucsf_document_id": Value("string"),
        "ucsf_document_page_no": Value("string"),
        "answers": List(Value("string")),
        "data_split": Value("string"),
    }
)


def _date(rng: np.random.Generator) -> str:
    return f"{int(rng.integers(1, 13)):02d}/{int(rng.integers(1, 29)):02d}/{int(rng.integers(2005, 2024))}"


def _name(rng: np.random.Generator) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _invoice(rng: np.random.Generator) -> tuple[str, list[tuple[str, str]], list[tuple[str, list[str], str]]]:
    company = str(rng.choice(COMPANIES))
    number, date, customer = str(int(rng.integers(10000, 99999))), _date(rng), _name(rng)
    items = [str(x) for x in rng.choice(ITEMS, size=int(rng.integers(2, 4)), replace=False)]
    prices = [int(rng.integers(150, 2500)) / 100 for _ in items]
    total = sum(prices)
    money = lambda x: f"{x:.2f}"  # noqa: E731
    lines = [("Invoice No:", number), ("Date:", date), ("Customer:", customer)]
    lines += [(item, money(p)) for item, p in zip(items, prices)]
    lines.append(("Total:", f"${money(total)}"))
    k = int(rng.integers(len(items)))
    questions = [
        ("What is the invoice number?", [number], "form"),
        ("What is the date of the invoice?", [date], "form"),
        ("Who is the customer?", [customer], "form"),
        ("What is the total amount?", [f"${money(total)}", money(total)], "table/list"),
        ("What is the name of the company?", [company], "layout"),
        (
            f"What is the price of {items[k].lower()}?",
            [money(prices[k]), f"${money(prices[k])}"],
            "table/list",
        ),
    ]
    return company, lines, questions


def _form(rng: np.random.Generator) -> tuple[str, list[tuple[str, str]], list[tuple[str, list[str], str]]]:
    title = str(rng.choice(["Registration Form", "Membership Form", "Application Form"]))
    name, city, date = _name(rng), str(rng.choice(CITIES)), _date(rng)
    phone = f"555-{int(rng.integers(1000, 9999))}"
    member = str(int(rng.integers(1000, 9999)))
    age = str(int(rng.integers(18, 80)))
    lines = [("Name:", name), ("City:", city), ("Phone:", phone), ("Member ID:", member), ("Age:", age),
             ("Date:", date)]  # fmt: skip
    questions = [
        ("What is the name written on the form?", [name], "form"),
        ("Which city is given on the form?", [city], "form"),
        ("What is the phone number?", [phone], "form"),
        ("What is the member ID?", [member], "form"),
        ("What is the age given on the form?", [age], "form"),
        ("What is the date on the form?", [date], "form"),
        ("What is the title of this document?", [title], "layout"),
    ]
    return title, lines, questions


def make_docvqa(rng: np.random.Generator, unit: int, size: int) -> Unit:
    title, lines, questions = (_invoice if unit % 2 == 0 else _form)(rng)
    tint = int(rng.integers(244, 256))
    img = PILImage.new("RGB", (size, size), (tint, tint, max(0, tint - int(rng.integers(0, 8)))))
    draw = ImageDraw.Draw(img)
    margin = size * 0.06
    fs = fit_font(font_px(size, 0.06), [f"{k}   {v}" for k, v in lines], size - 2 * margin)
    fs_title = fit_font(font_px(size, 0.075), [title], size - 2 * margin)
    text_box(draw, (margin, margin * 0.7), title, fs_title, fill=(10, 10, 60))
    y = margin * 0.7 + fs_title * 1.5
    draw.line((margin, y - fs * 0.3, size - margin, y - fs * 0.3), fill=(90, 90, 90), width=1)
    step = min(fs * 1.45, (size - y - margin * 0.5) / len(lines))
    for key, value in lines:
        text_box(draw, (margin, y), key, fs, fill=(40, 40, 40))
        text_box(draw, (size - margin, y), value, fs, fill=(10, 10, 10), anchor="ra")
        y += step
    picks = rng.permutation(len(questions))[: int(rng.integers(1, 3))]
    rows = [
        {
            "questionId": str(unit * 10 + k),
            "question": questions[int(p)][0],
            "question_types": [questions[int(p)][2]],
            "docId": unit,
            "ucsf_document_id": f"mini{unit:06d}",
            "ucsf_document_page_no": "1",
            "answers": questions[int(p)][1],
            "data_split": "val",
        }
        for k, p in enumerate(picks)
    ]
    caption = f"A document titled {title} with " + "; ".join(f"{k} {v}" for k, v in lines) + "."
    return Unit(img, rows, caption=caption)
