"""The mini suite with legible POPE scenes: 2-3 objects on a 2x2 grid (instead of 3-6 on a 3x3 grid).

python results/tiny/experiments/suite_legible_pope.py OUT
"""

import inspect
import sys

import stgc.data.bench_scenes as S
from stgc.data import generate_suite
from stgc.data.render import COLOR_NAMES, sample_scene
from stgc.data.scenes import sample_shapes

CLASS_COLOURS = {
    "circle": "red", "heart": "blue", "hexagon": "orange", "square": "green", "diamond": "yellow",
    "cross": "brown", "triangle": "purple", "star": "pink", "arrow": "red", "pentagon": "green",
}  # fmt: skip


def _class_colour_scene(rng, size, n_min, n_max):
    shapes = sample_shapes(rng, int(rng.integers(n_min, n_max + 1)))
    return sample_scene(rng, size, shapes, [CLASS_COLOURS[s] for s in shapes]), shapes


def _pope_scene(rng, size, n_min, n_max):
    n = int(rng.integers(2, 4))
    shapes = sample_shapes(rng, n)
    colors = [COLOR_NAMES[int(i)] for i in rng.integers(len(COLOR_NAMES), size=n)]
    return sample_scene(rng, size, shapes, colors, grid=2), shapes


# make_pope alone draws its scenes with _pope_scene (the registry holds the function object: patch its code)
S._pope_scene = _class_colour_scene if "--class-colours" in sys.argv[2:] else _pope_scene
source = inspect.getsource(S.make_pope).replace("_scene(rng, size, 3, 6)", "_pope_scene(rng, size, 3, 6)")
namespace: dict = {}
exec(source, S.__dict__, namespace)
S.make_pope.__code__ = namespace["make_pope"].__code__
generate_suite(sys.argv[1], overwrite=True)
