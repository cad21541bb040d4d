"""Drawing primitives shared by every mini benchmark: palettes, shapes, scenes, text and degradations.

Every size is a fraction of the image side, so a suite generated at 64 px and one at 1024 px hold the
same content. Text uses Pillow's built-in scalable font (``ImageFont.load_default(size=...)``, Pillow >=
10.1 with FreeType), so nothing is downloaded; at the default 224 px the smallest text is 12 px tall.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

RGB = tuple[int, int, int]

# Colour names a person would agree on at a glance (no teal/magenta borderline hues).
COLORS: dict[str, RGB] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (245, 200, 20),
    "purple": (148, 60, 189),
    "orange": (255, 127, 14),
    "pink": (247, 120, 190),
    "brown": (140, 86, 50),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "pentagon",
    "hexagon",
    "star",
    "cross",
    "heart",
    "arrow",
)
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES} | {"cross": "crosses"}
SIDES: dict[str, int] = {"triangle": 3, "square": 4, "diamond": 4, "pentagon": 5, "hexagon": 6}


@functools.lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's embedded scalable font at ``size`` px (cached: a lookup per text line is free)."""
    return ImageFont.load_default(size=max(6, int(size)))


def font_px(image_size: int, fraction: float, minimum: int = 10) -> int:
    """Font size as a fraction of the image side, never below ``minimum`` px (legibility floor)."""
    return max(minimum, round(image_size * fraction))


def fit_font(size: int, texts: list[str], max_width: float, minimum: int = 4) -> int:
    """The largest font size <= ``size`` at which every text fits in ``max_width`` px. At small image sizes
    this shrinks text below legibility rather than let it overlap (text needs about 160 px images)."""
    while size > minimum and max(font(size).getlength(t) for t in texts) > max_width:
        size -= 1
    return size


def background(rng: np.random.Generator, size: int, light: bool = True) -> Image.Image:
    """A plain pale (or dark) background with a random tint, so no two images share pixels by accident."""
    base = rng.integers(225, 251, size=3) if light else rng.integers(20, 50, size=3)
    return Image.new("RGB", (size, size), tuple(int(c) for c in base))


def jitter_color(rng: np.random.Generator, name: str, amount: int = 12) -> RGB:
    """The named colour with a small random offset (keeps the name unambiguous, makes images unique)."""
    r, g, b = COLORS[name]
    d = rng.integers(-amount, amount + 1, size=3)
    return (int(np.clip(r + d[0], 0, 255)), int(np.clip(g + d[1], 0, 255)), int(np.clip(b + d[2], 0, 255)))


def _regular_polygon(cx: float, cy: float, r: float, n: int, rotation: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(rotation + 2 * math.pi * k / n), cy + r * math.sin(rotation + 2 * math.pi * k / n))
        for k in range(n)
    ]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: RGB) -> None:
    """Draw ``shape`` centred at (cx, cy) with circumradius ``r`` and a thin dark outline."""
    outline = (40, 40, 40)
    width = max(1, round(r / 14))
    up = -math.pi / 2
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=width)
    elif shape == "heart":
        # the classic parametric heart, x in [-16, 16], y in about [-12, 17] (screen y grows downwards)
        t = np.linspace(0, 2 * math.pi, 60, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) - 2.5
        k = r / 15.5
        pts = [(cx + float(a) * k, cy + float(b) * k) for a, b in zip(x, y)]
        draw.polygon(pts, fill=fill, outline=outline, width=width)
    elif shape == "square":
        s = r * 0.8
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill, outline=outline, width=width)
    elif shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy + r * 0.15, r, 3, up), fill=fill, outline=outline, width=width)
    elif shape == "diamond":
        pts = [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
        draw.polygon(pts, fill=fill, outline=outline, width=width)
    elif shape == "pentagon":
        draw.polygon(_regular_polygon(cx, cy, r, 5, up), fill=fill, outline=outline, width=width)
    elif shape == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, 0.0), fill=fill, outline=outline, width=width)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = up + math.pi * k / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        draw.polygon(pts, fill=fill, outline=outline, width=width)
    elif shape == "cross":
        t = r * 0.33
        pts = [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
            (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
            (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
        draw.polygon(pts, fill=fill, outline=outline, width=width)
    elif shape == "arrow":
        t = r * 0.3
        pts = [
            (cx - r, cy - t), (cx + r * 0.1, cy - t), (cx + r * 0.1, cy - r * 0.7), (cx + r, cy),
            (cx + r * 0.1, cy + r * 0.7), (cx + r * 0.1, cy + t), (cx - r, cy + t),
        ]  # fmt: skip
        draw.polygon(pts, fill=fill, outline=outline, width=width)
    else:
        raise AssertionError(f"unknown shape {shape!r}")


@dataclass(frozen=True)
class SceneObject:
    """One object of a shape scene: its names and where it sits (grid cell and pixel centre)."""

    shape: str
    color: str
    row: int  # grid row, 0 = top
    col: int  # grid column, 0 = left
    cx: float
    cy: float
    radius: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    grid: int


def sample_scene(
    rng: np.random.Generator,
    size: int,
    shapes: list[str],
    colors: list[str],
    grid: int = 3,
    scale: tuple[float, float] | list[tuple[float, float]] = (0.55, 0.8),
) -> Scene:
    """Place one object per (shape, colour) pair in distinct cells of a ``grid`` x ``grid`` layout.

    Distinct cells mean objects never overlap and "left of" / "above" have an unambiguous answer whenever
    two objects sit in different columns / rows. ``scale`` is the radius range as a fraction of half a
    cell, one range for all objects or one per object.
    """
    assert len(shapes) == len(colors) <= grid * grid
    scales = scale if isinstance(scale, list) else [scale] * len(shapes)
    cells = rng.choice(grid * grid, size=len(shapes), replace=False)
    cell = size / grid
    objects = []
    for shape, color, c, sc in zip(shapes, colors, cells, scales):
        row, col = divmod(int(c), grid)
        radius = cell / 2 * float(rng.uniform(*sc))
        slack = cell / 2 - radius
        cx = (col + 0.5) * cell + float(rng.uniform(-slack, slack)) * 0.8
        cy = (row + 0.5) * cell + float(rng.uniform(-slack, slack)) * 0.8
        objects.append(SceneObject(shape, color, row, col, cx, cy, radius))
    return Scene(tuple(objects), grid)


def draw_scene(rng: np.random.Generator, scene: Scene, size: int) -> Image.Image:
    img = background(rng, size)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        draw_shape(draw, obj.shape, obj.cx, obj.cy, obj.radius, jitter_color(rng, obj.color))
    return img


def text_box(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    size: int,
    fill: RGB = (20, 20, 20),
    box: RGB | None = None,
    pad: int = 4,
    anchor: str = "la",
) -> tuple[float, float, float, float]:
    """Write ``text`` (optionally on a filled box) and return its bounding box."""
    f = font(size)
    bbox = draw.textbbox(xy, text, font=f, anchor=anchor)
    if box is not None:
        draw.rectangle((bbox[0] - pad, bbox[1] - pad, bbox[2] + pad, bbox[3] + pad), fill=box)
    draw.text(xy, text, font=f, fill=fill, anchor=anchor)
    return bbox


def text_width(text: str, size: int) -> float:
    return font(size).getlength(text)


def contrast_text(rgb: RGB) -> RGB:
    """Black or white, whichever reads better on ``rgb`` (ITU-R BT.601 luma)."""
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (15, 15, 15) if luma > 140 else (250, 250, 250)


def degrade(rng: np.random.Generator, img: Image.Image, kind: str) -> Image.Image:
    """Make ``img`` unanswerable the way VizWiz photos are: out of focus, too dark, or framed off-target."""
    size = img.size[0]
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=size * 0.08))
    if kind == "dark":
        arr = np.asarray(img, dtype=np.float32) * float(rng.uniform(0.03, 0.07))
        noise = rng.normal(0, 2.0, size=arr.shape)
        return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))
    if kind == "crop":
        # Keep only a corner that the content never reaches (callers keep content off the corners).
        strip = max(2, size // 10)
        corner = img.crop((0, 0, strip, strip)).resize((size, size), Image.Resampling.BILINEAR)
        return corner.filter(ImageFilter.GaussianBlur(radius=size * 0.02))
    raise AssertionError(f"unknown degradation {kind!r}")


def image_hash(img: Image.Image) -> str:
    """Content hash of the decoded pixels (PNG round-trips exactly, so a saved image hashes the same)."""
    rgb = img.convert("RGB")
    h = hashlib.sha1(f"{rgb.size}".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()
