"""Shape-scene benchmarks: VQAv2 (colour / shape / count / yes-no), GQA (spatial relations) and POPE
(object existence with random / popular / adversarial negatives)."""

from __future__ import annotations

import numpy as np
from datasets import Features, Image, List, Value

from stgc.data import params
from stgc.data.common import Unit, annotator_answers
from stgc.data.render import COLOR_NAMES, Scene, draw_scene, sample_scene
from stgc.data.scenes import describe, pope_negative, sample_shapes


def _scene(rng: np.random.Generator, size: int, n_min: int, n_max: int) -> tuple[Scene, list[str]]:
    n = int(rng.integers(n_min, n_max + 1))
    shapes = sample_shapes(rng, n)
    colors = [COLOR_NAMES[int(i)] for i in rng.integers(len(COLOR_NAMES), size=n)]
    return sample_scene(rng, size, shapes, colors), shapes


def _caption(scene: Scene) -> str:
    ordered = sorted(scene.objects, key=lambda o: (o.row, o.col))
    return describe([(o.color, o.shape) for o in ordered])


# ----------------------------------------------------------------------------------------------- VQAv2

VQAV2_FEATURES = Features(
    {
        "question_type": Value("string"),
        "multiple_choice_answer": Value("string"),
        "answers": List(
            {"answer": Value("string"), "answer_confidence": Value("string"), "answer_id": Value("int64")}
        ),
        "image_id": Value("int64"),
        "answer_type": Value("string"),
        "question_id": Value("int64"),
        "question": Value("string"),
        "image": Image(),
    }
)


def _vqav2_question(
    rng: np.random.Generator, scene: Scene, kind: str
) -> tuple[str, str, str, str, list[str]]:
    """(question, answer, question_type, answer_type, wrong alternatives) for one question kind."""
    objs = list(scene.objects)
    obj = objs[int(rng.integers(len(objs)))]
    colors = [o.color for o in objs]
    if kind == "color":
        return f"What color is the {obj.shape}?", obj.color, "what color is the", "other", list(COLOR_NAMES)
    if kind == "shape" and colors.count(obj.color) == 1:
        q = f"What shape is the {obj.color} object?"
        return q, obj.shape, "what shape is the", "other", [o.shape for o in objs]
    if kind == "count":
        if rng.random() < 0.5:
            q, n = "How many objects are there?", len(objs)
            q_type = "how many"
        else:
            color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
            q, n = f"How many {color} objects are there?", colors.count(color)
            q_type = "how many"
        return q, str(n), q_type, "number", [str(max(0, n - 1)), str(n + 1)]
    # yes/no existence of a coloured shape: half the time a present one, else a near miss
    if rng.random() < 0.5:
        return f"Is there a {obj.color} {obj.shape}?", "yes", "is there a", "yes/no", ["no"]
    wrong = [c for c in COLOR_NAMES if not any(o.shape == obj.shape and o.color == c for o in objs)]
    color = wrong[int(rng.integers(len(wrong)))]
    return f"Is there a {color} {obj.shape}?", "no", "is there a", "yes/no", ["yes"]


def make_vqav2(rng: np.random.Generator, unit: int, size: int) -> Unit:
    scene, _ = _scene(rng, size, 2, 6)
    image = draw_scene(rng, scene, size)
    kinds = list(rng.permutation(["color", "shape", "count", "yesno"])[: int(rng.integers(1, 4))])
    rows, seen = [], set()
    for k, kind in enumerate(kinds):
        q, a, q_type, a_type, alts = _vqav2_question(rng, scene, str(kind))
        if q in seen:
            continue
        seen.add(q)
        answers = annotator_answers(rng, a, alts)
        rows.append(
            {
                "question_type": q_type,
                "multiple_choice_answer": a,
                "answers": [
                    {"answer": ans, "answer_confidence": "yes" if ans == a else "maybe", "answer_id": i + 1}
                    for i, ans in enumerate(answers)
                ],
                "image_id": unit,
                "answer_type": a_type,
                "question_id": unit * 10 + k,
                "question": q,
            }
        )
    return Unit(image, rows, caption=_caption(scene))


# ------------------------------------------------------------------------------------------------- GQA

GQA_FEATURES = Features(
    {
        "id": Value("string"),
        "imageId": Value("string"),
        "question": Value("string"),
        "answer": Value("string"),
        "fullAnswer": Value("string"),
        "isBalanced": Value("bool"),
        "image": Image(),
    }
)


def _relation_questions(rng: np.random.Generator, scene: Scene) -> list[tuple[str, str, str]]:
    """All well-posed (question, answer, full answer) relation questions of a scene, shuffled."""
    out: list[tuple[str, str, str]] = []
    objs = list(scene.objects)
    for a in objs:
        for b in objs:
            if a is b:
                continue
            if a.col != b.col:
                left = a.col < b.col
                out.append(
                    (
                        f"Is the {a.name} to the left of the {b.name}?",
                        "yes" if left else "no",
                        f"{'Yes' if left else 'No'}, the {a.name} is to the "
                        f"{'left' if left else 'right'} of the {b.name}.",
                    )
                )
                out.append(
                    (
                        f"Is the {a.name} to the left or to the right of the {b.name}?",
                        "left" if left else "right",
                        f"The {a.name} is to the {'left' if left else 'right'} of the {b.name}.",
                    )
                )
            if a.row != b.row:
                above = a.row < b.row
                out.append(
                    (
                        f"Is the {a.name} above or below the {b.name}?",
                        "above" if above else "below",
                        f"The {a.name} is {'above' if above else 'below'} the {b.name}.",
                    )
                )
        # "What shape is to the left of X?" only when exactly one object is left of X
        lefts = [o for o in objs if o.col < a.col]
        if len(lefts) == 1:
            o = lefts[0]
            out.append(
                (
                    f"Which shape is to the left of the {a.name}?",
                    o.shape,
                    f"The shape to the left of the {a.name} is a {o.shape}.",
                )
            )
        aboves = [o for o in objs if o.row < a.row]
        if len(aboves) == 1:
            o = aboves[0]
            out.append(
                (
                    f"What color is the shape above the {a.name}?",
                    o.color,
                    f"The shape above the {a.name} is {o.color}.",
                )
            )
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def make_gqa(rng: np.random.Generator, unit: int, size: int) -> Unit:
    while True:  # resample the rare scene where every object shares one row and one column pattern
        scene, _ = _scene(rng, size, 2, 5)
        questions = _relation_questions(rng, scene)
        if questions:
            break
    image = draw_scene(rng, scene, size)
    rows = [
        {
            "id": f"{unit}{k:02d}",
            "imageId": f"n{unit:06d}",
            "question": q,
            "answer": a,
            "fullAnswer": full,
            "isBalanced": True,
        }
        for k, (q, a, full) in enumerate(questions[: int(rng.integers(1, 3))])
    ]
    return Unit(image, rows, caption=_caption(scene), extra={"full_answers": [r["fullAnswer"] for r in rows]})


# ------------------------------------------------------------------------------------------------ POPE

POPE_FEATURES = Features(
    {
        "id": Value("string"),
        "question_id": Value("string"),
        "question": Value("string"),
        "answer": Value("string"),
        "image_source": Value("string"),
        "image": Image(),
        "category": Value("string"),
    }
)
POPE_CATEGORIES = params.POPE_CATEGORIES


def pope_question(shape: str) -> str:
    """POPE's existence question about ``shape``."""
    return f"Is there a {shape} in the image?"


def make_pope(rng: np.random.Generator, unit: int, size: int) -> Unit:
    """One image, one 'yes' and one 'no' question; the negative drawn by the unit's POPE category."""
    category = POPE_CATEGORIES[unit % 3]
    scene, shapes = _scene(rng, size, 3, 6)
    image = draw_scene(rng, scene, size)
    positive = shapes[int(rng.integers(len(shapes)))]
    negative = pope_negative(rng, shapes, category)
    pairs = [(positive, "yes"), (negative, "no")]
    if rng.random() < 0.5:
        pairs.reverse()
    rows = [
        {
            "id": str(unit * 2 + k),
            "question_id": str(unit * 2 + k),
            "question": pope_question(shape),
            "answer": answer,
            "image_source": f"mini_{unit:06d}",
            "category": category,
        }
        for k, (shape, answer) in enumerate(pairs)
    ]
    return Unit(image, rows, caption=_caption(scene), extra={"present": list(shapes)})
