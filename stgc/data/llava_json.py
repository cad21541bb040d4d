"""LLaVA-mix-665K as distributed: ``llava_v1_5_mix665k.json`` plus an image folder (coco/train2017,
gqa/images, ocr_vqa/images, textvqa/train_images, vg/VG_100K, vg/VG_100K_2), as ``data.train``.

A row is ``{"id", "image"?: "<path under the image folder>", "conversations": [{"from": "human" | "gpt",
"value": ...}, ...]}``: multi-turn, turns alternating human / gpt from a human turn; rows without ``image``
are text-only (ShareGPT). Every row is checked when the file is loaded, before training starts, and the
first malformed one is an error naming its position, its id and the field: a missing image file, an image
path that leaves the image folder (``..`` or an absolute path), an unknown role, an empty turn, a turn out of
order, an ``<image>`` placeholder without an image (or an image without one).

LLaVA's preprocessing moves each ``<image>`` to the front of its turn ("<image>\\n" + the rest, stripped;
665K has it at the end of some questions); rows come out of the dataset that way, with the image opened
as RGB, for ``stgc.data.collate.LlavaCollator`` (labels on the assistant turns only). ``modality_lengths``
are LLaVA's ``group_by_modality_length`` lengths: the whitespace word count of a row, negative for
text-only rows (``stgc.data.sampling``).

``write_replica`` writes a small generated dataset in the same layout (tests, ``stgc data --llava-replica``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE = "<image>"
ROLES = ("human", "gpt")
JSON_NAME = "llava_v1_5_mix665k.json"
# the image folder of LLaVA-1.5's instruction tuning (LLaVA's README, "Visual Instruction Tuning")
IMAGE_DIRS = (
    "coco/train2017",
    "gqa/images",
    "ocr_vqa/images",
    "textvqa/train_images",
    "vg/VG_100K",
    "vg/VG_100K_2",
)


def is_llava_json(path: str | os.PathLike) -> bool:
    """Whether ``data.train`` names a LLaVA JSON file (rather than a ``save_to_disk`` folder)."""
    return str(path).endswith(".json")


def move_image_to_front(conversations: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """LLaVA's ``preprocess_multimodal``: a turn holding ``<image>`` becomes "<image>\\n" + the rest,
    stripped."""
    out = []
    for turn in conversations:
        value = turn["value"]
        if IMAGE in value:
            value = f"{IMAGE}\n{value.replace(IMAGE, '').strip()}"
        out.append({"from": turn["from"], "value": value})
    return out


class LlavaJsonDataset(torch.utils.data.Dataset):
    """The checked rows of a LLaVA JSON file; items are ``{"id", "image": PIL.Image | None,
    "conversations"}`` with ``<image>`` moved to the front."""

    def __init__(self, rows: list[dict[str, Any]], image_folder: Path, source: str):
        self.rows = rows
        self.image_folder = image_folder
        self.source = source

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image

        row = self.rows[i]
        image = None
        if "image" in row:
            path = self.image_folder / row["image"]
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except OSError as err:  # unreadable or truncated: name the row, do not skip it
                raise ValueError(
                    f"{self.source}: row {i} (id {row.get('id')!r}): image {row['image']!r} cannot be read "
                    f"({err}); replace the file or remove the row."
                ) from None
        return {
            "id": str(row.get("id", i)),
            "image": image,
            "conversations": move_image_to_front(row["conversations"]),
        }

    @property
    def modality_lengths(self) -> list[int]:
        """Words per row (whitespace split, all turns), negative for text-only rows (LLaVA's lengths)."""
        out = []
        for row in self.rows:
            n = sum(len(turn["value"].split()) for turn in row["conversations"])
            out.append(n if "image" in row else -n)
        return out

    def select(self, indices: Sequence[int]) -> LlavaJsonDataset:
        """The rows at ``indices`` (``data.max_samples``)."""
        return LlavaJsonDataset([self.rows[i] for i in indices], self.image_folder, self.source)


def load_llava_json(
    path: str | os.PathLike, image_folder: str | os.PathLike | None = None, check_files: bool = True
) -> LlavaJsonDataset:
    """The rows of a LLaVA JSON file, every one checked (module docstring); ``image_folder`` defaults to
    the JSON file's folder. ValueError (one line: the row, the field, the fix) for the first bad row."""
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    if not path.is_file():
        raise ValueError(f"data.train={str(path)!r} does not exist; point it at llava_v1_5_mix665k.json.")
    if not folder.is_dir():
        raise ValueError(
            f"data.image_folder={str(folder)!r} is not a folder; point it at the folder holding "
            f"{', '.join(IMAGE_DIRS[:2])}, ..."
        )
    try:
        rows = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); use LLaVA's JSON list of rows.") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path} holds no rows; LLaVA's format is a JSON list of rows.")
    for i, row in enumerate(rows):
        check_row(row, i, folder, str(path), check_files)
    return LlavaJsonDataset(rows, folder, str(path))


def check_row(row: Any, i: int, folder: Path, source: str, check_files: bool = True) -> None:
    """ValueError naming row ``i`` and its bad field, or nothing."""
    rid = row.get("id") if isinstance(row, dict) else None
    where = f"{source}: row {i} (id {rid!r})"
    if not isinstance(row, dict):
        raise ValueError(f"{where}: is a {type(row).__name__}, not an object with id, image, conversations.")
    if "video" in row:
        raise ValueError(f"{where}: video rows are not supported; remove the row.")
    image = row.get("image")
    if "image" in row:
        if not isinstance(image, str) or not image:
            raise ValueError(
                f"{where}: image is {image!r}; give one image path relative to the image folder, or no key."
            )
        folder_abs = os.path.normpath(os.path.abspath(folder))
        target = os.path.normpath(os.path.join(folder_abs, image))
        if os.path.isabs(image) or not target.startswith(folder_abs + os.sep):
            raise ValueError(
                f"{where}: image {image!r} points outside the image folder {folder}; image paths are "
                "relative to data.image_folder and stay inside it."
            )
        if check_files and not os.path.isfile(target):
            raise ValueError(
                f"{where}: image file {image!r} is missing from {folder}; add it or set data.image_folder "
                "to the folder that holds coco/, gqa/, ocr_vqa/, textvqa/, vg/."
            )
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: conversations is {turns!r}; give a list of human / gpt turns.")
    placeholders = 0
    for j, turn in enumerate(turns):
        field = f"conversations[{j}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: {field} is not an object with 'from' and 'value'.")
        role, value = turn.get("from"), turn.get("value")
        if role not in ROLES:
            raise ValueError(f"{where}: {field}.from is {role!r}; a turn is from 'human' or 'gpt'.")
        if role != ROLES[j % 2]:
            raise ValueError(
                f"{where}: {field}.from is {role!r} where {ROLES[j % 2]!r} is due; turns alternate human, "
                "gpt, starting with human."
            )
        if not isinstance(value, str) or not value.replace(IMAGE, "").strip():
            raise ValueError(f"{where}: {field}.value is empty; every turn needs text.")
        placeholders += value.count(IMAGE)
    if len(turns) < 2:
        raise ValueError(f"{where}: conversations has no gpt turn; a row needs an answer to learn.")
    if image is not None and placeholders != 1:
        raise ValueError(
            f"{where}: conversations hold {placeholders} {IMAGE} placeholders for one image; use exactly one."
        )
    if image is None and placeholders:
        raise ValueError(
            f"{where}: conversations hold {IMAGE} but the row has no image; add image or remove it."
        )


# --------------------------------------------------------------------------------------------------------
# a small replica in the same layout


def write_replica(
    out: str | os.PathLike, rows: int = 24, seed: int = 0, image_size: tuple[int, int] = (48, 32)
) -> Path:
    """A generated dataset in LLaVA-mix-665K's layout under ``out``: ``llava_v1_5_mix665k.json`` and images
    under the 665K sub-folders (non-square, so that padding to a square matters). Every sixth row is
    text-only, image rows are single or multi-turn, some with ``<image>`` after the question as in 665K.
    Returns the JSON path."""
    from PIL import Image

    out = Path(out)
    rng = np.random.default_rng(seed)
    colors = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
    shapes = ("square", "circle")
    data: list[dict[str, Any]] = []
    for i in range(rows):
        if i % 6 == 5:  # ShareGPT-style text-only rows
            a, b = int(rng.integers(1, 9)), int(rng.integers(1, 9))
            data.append(
                {
                    "id": f"text_{i:04d}",
                    "conversations": [
                        {"from": "human", "value": f"What is {a} plus {b}?"},
                        {"from": "gpt", "value": f"{a} plus {b} is {a + b}."},
                        {"from": "human", "value": "And times two?"},
                        {"from": "gpt", "value": f"It is {2 * (a + b)}."},
                    ],
                }
            )
            continue
        name = list(colors)[int(rng.integers(len(colors)))]
        shape = shapes[int(rng.integers(len(shapes)))]
        sub = IMAGE_DIRS[i % len(IMAGE_DIRS)]
        rel = f"{sub}/{i:012d}.jpg"
        w, h = image_size if i % 2 else image_size[::-1]
        pixels = np.full((h, w, 3), 245, dtype=np.uint8)
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        pixels[y0 : y0 + h // 2, x0 : x0 + w // 2] = colors[name]
        (out / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(out / rel, quality=95)
        first = f"What color is the {shape}?"
        first = f"{first}\n{IMAGE}" if i % 3 == 1 else f"{IMAGE}\n{first}"  # 665K has both placements
        turns = [{"from": "human", "value": first}, {"from": "gpt", "value": name}]
        if i % 2 == 0:
            turns += [
                {"from": "human", "value": "Answer the question using a single word or phrase. Is it red?"},
                {"from": "gpt", "value": "yes" if name == "red" else "no"},
            ]
        data.append({"id": f"{i:09d}", "image": rel, "conversations": turns})
    out.mkdir(parents=True, exist_ok=True)
    path = out / JSON_NAME
    path.write_text(json.dumps(data, indent=1))
    return path
