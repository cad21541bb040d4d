"""A contact sheet of the mini suite: a few evaluation rows of every benchmark with image, question and
gold answer (results/mini_suite/contact_sheet.png is made by ``make_contact_sheet``)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from stgc.data.generate import eval_rows
from stgc.data.prompts import doc_to_target
from stgc.data.registry import BENCHMARKS
from stgc.data.render import font


def _caption(name: str, row: dict) -> list[str]:
    q = row["question"]
    lines = [f"Q: {q}"]
    if name == "mmbench":
        lines.append("   " + "  ".join(f"{c}. {row[c]}" for c in "ABCD"))
        if row["hint"] != "nan":
            lines.insert(0, f"Hint: {row['hint']}")
    if name == "scienceqa_img":
        lines.append("   " + "  ".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(row["choices"])))
        if row["hint"]:
            lines.insert(0, f"Hint: {row['hint']}")
    extra = ""
    if name in ("pope", "mme"):
        extra = f"  [{row['category']}]"
    if name == "chartqa":
        extra = f"  [{row['type']}]"
    lines.append(f"A: {doc_to_target(name, row)}{extra}")
    return lines


_VARIETY_KEY = {
    "vizwiz": "category",
    "pope": "category",
    "mme": "category",
    "mmbench": "category",
    "chartqa": "type",
    "scienceqa_img": "question",
    "gqa": "answer",
    "textvqa": "question",
}


def _varied(name: str, rows: list[dict], samples: int) -> list[dict]:
    """One row per image, first covering distinct values of the benchmark's variety key."""
    key = _VARIETY_KEY.get(name)
    picked: list[dict] = []
    images: set[int] = set()
    for strict in (True, False):
        seen = {r[key] for r in picked} if key else set()
        for row in rows:
            if len(picked) == samples:
                return picked
            if id(row["image"]) in images or (strict and key and row[key] in seen):
                continue
            picked.append(row)
            images.add(id(row["image"]))
            if key:
                seen.add(row[key])
    return picked


def make_contact_sheet(
    path: str | Path,
    samples: int = 4,
    image_size: int = 224,
    seed: int = 0,
    benchmarks: list[str] | None = None,
) -> Path:
    """Render ``samples`` rows (each from a different image) of every benchmark into one PNG at ``path``."""
    names = benchmarks or list(BENCHMARKS)
    pad, text_h, label_w = 8, 118, 120
    cell_w = max(image_size, 260)
    fs = 11
    sheet = Image.new(
        "RGB",
        (label_w + samples * (cell_w + pad) + pad, len(names) * (image_size + text_h + pad) + pad),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    for r, name in enumerate(names):
        rows, _ = eval_rows(name, samples * 8, seed, image_size)
        picked = _varied(name, rows, samples)
        y = pad + r * (image_size + text_h + pad)
        draw.text((pad, y + 4), name, font=font(15), fill=(0, 0, 0))
        draw.text((pad, y + 24), BENCHMARKS[name].split, font=font(11), fill=(90, 90, 90))
        for c, row in enumerate(picked):
            x = label_w + c * (cell_w + pad)
            sheet.paste(row["image"], (x, y))
            ty = y + image_size + 3
            for line in _caption(name, row):
                for piece in textwrap.wrap(line, width=46, subsequent_indent="   ") or [""]:
                    if ty + fs > y + image_size + text_h:
                        break
                    draw.text((x, ty), piece, font=font(fs), fill=(20, 20, 20))
                    ty += fs + 2
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    return path


if __name__ == "__main__":  # python -m stgc.data.contact_sheet [path]
    import sys

    print(make_contact_sheet(sys.argv[1] if len(sys.argv) > 1 else "results/mini_suite/contact_sheet.png"))
