"""Stage 0 for a model size that has no pretrained vision tower to start from (the tiny model).

MoE-LLaVA starts from a pretrained CLIP tower and keeps it frozen; nothing the tiny model could download
plays that part, and a tower trained from scratch through a randomly initialised language model never
learns to pass on what is in the image (results/tiny/experiments/README.md). So the tiny tower is
pretrained first, with direct supervision: on freshly drawn shape scenes (1-6 objects on a 2 x 2 or 3 x 3
grid, the mini suite's renderer), a linear head on every patch token LLaVA reads (the second-to-last
layer) names the shape and the colour of the object whose centre lies in that patch ("none" elsewhere).
The scenes come from their own random stream (``seed`` below), not from the mini suite's training or
evaluation images; with random positions, sizes and colour jitter no two images coincide.

    pretrain_vision("tiny", Path("runs/tiny/vision-tiny"))  -> the folder (CLIPVisionModel.save_pretrained)

The folder also holds ``vision_stage.json``: the settings and the held-out accuracies (shape and colour on
object patches of scenes on a 3 x 3 grid). A finished folder is reused; one with other settings is
refused. ``model.vision_init`` (``stgc.run_config.ModelConfig``) names this stage or any CLIP vision
folder; ``load_vision_tower`` puts it into a freshly built LLaVA.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

STAGE_FILE = "vision_stage.json"


@dataclasses.dataclass(frozen=True)
class VisionStage:
    """Settings of the per-patch pretraining. With the defaults, the tiny tower in a fresh-clone `make demo`
    (its ``vision_stage.json``): 70.9 s on 2 CPU cores, held-out shape accuracy 0.863 and colour accuracy
    1.000 on object patches."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    image_size: int = 224  # the drawn scenes' side before the tower's processor resizes them
    val_scenes: int = 500  # held-out scenes (3 x 3 grid) for the accuracies in vision_stage.json


def pretrain_vision(
    size: str, out: Path, stage: VisionStage = VisionStage(), log: Callable[[str], None] | None = None
) -> Path:
    """Train the CLIP tower of model size ``size`` per patch (module docstring) into ``out``; a finished
    ``out`` with the same size and settings is returned as it is."""
    from transformers import CLIPVisionModel

    from stgc.backbones import vision_config
    from stgc.data.render import COLOR_NAMES, SHAPES
    from stgc.modeling import build_image_processor

    out = Path(out)
    wanted = {"size": size, **dataclasses.asdict(stage)}
    if (out / STAGE_FILE).exists():
        done = json.loads((out / STAGE_FILE).read_text())
        if {k: done.get(k) for k in wanted} != wanted:
            raise ValueError(
                f"{out} holds a vision stage with other settings ({ {k: done.get(k) for k in wanted} }); "
                f"remove it or use another folder for {wanted}."
            )
        return out
    vision = vision_config(size)
    torch.manual_seed(stage.seed)
    rng = np.random.default_rng([stage.seed, 0x5715])
    tower = CLIPVisionModel(vision)
    heads = nn.ModuleDict(
        {
            "shape": nn.Linear(vision.hidden_size, len(SHAPES) + 1),
            "color": nn.Linear(vision.hidden_size, len(COLOR_NAMES) + 1),
        }
    )
    params = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=stage.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=stage.lr, total_steps=stage.steps, pct_start=0.05
    )
    pixels = build_image_processor(vision.image_size)
    cells = vision.image_size // vision.patch_size

    def patch_tokens(images: list) -> torch.Tensor:
        x = pixels(images, return_tensors="pt")["pixel_values"]
        return tower(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]

    def loss_of(tokens: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        ce = nn.functional.cross_entropy
        return sum(ce(heads[k](tokens).flatten(0, 1), labels[k].flatten()) for k in heads)

    val_images, val_labels = scene_batch(rng, stage.val_scenes, cells, stage.image_size, grids=(3,))
    t0 = time.perf_counter()
    tower.train()
    for step in range(stage.steps):
        images, labels = scene_batch(rng, stage.batch_size, cells, stage.image_size)
        loss = loss_of(patch_tokens(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if log is not None and (step + 1) % 100 == 0:
            log(f"vision stage: step {step + 1}/{stage.steps}, loss {loss.item():.3f}")
    tower.eval()
    with torch.no_grad():
        tokens = patch_tokens(val_images)
        on_object = val_labels["shape"] > 0
        accuracy = {
            f"{k}_accuracy": float(
                (heads[k](tokens).argmax(-1)[on_object] == val_labels[k][on_object]).float().mean()
            )
            for k in heads
        }
    out.mkdir(parents=True, exist_ok=True)
    tower.save_pretrained(out)
    record = {**wanted, **accuracy, "seconds": round(time.perf_counter() - t0, 1)}
    (out / STAGE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return out


def scene_batch(
    rng: np.random.Generator, n: int, cells: int, image_size: int, grids: tuple[int, ...] = (2, 3)
) -> tuple[list, dict[str, torch.Tensor]]:
    """``n`` shape scenes and, per patch of a ``cells`` x ``cells`` tower grid, the index (1-based, 0 for
    none) of the shape and colour of the object centred in it."""
    from stgc.data.render import COLOR_NAMES, SHAPES, draw_scene, sample_scene
    from stgc.data.scenes import sample_shapes

    images = []
    shape_ids = torch.zeros(n, cells * cells, dtype=torch.long)
    color_ids = torch.zeros_like(shape_ids)
    for i in range(n):
        grid = int(rng.choice(grids))
        k = int(rng.integers(1, min(6, grid * grid) + 1))
        shapes = sample_shapes(rng, k)
        colors = [COLOR_NAMES[int(c)] for c in rng.integers(len(COLOR_NAMES), size=k)]
        scene = sample_scene(rng, image_size, shapes, colors, grid=grid)
        images.append(draw_scene(rng, scene, image_size))
        for o in scene.objects:
            row = min(int(o.cy / image_size * cells), cells - 1)
            col = min(int(o.cx / image_size * cells), cells - 1)
            shape_ids[i, row * cells + col] = SHAPES.index(o.shape) + 1
            color_ids[i, row * cells + col] = COLOR_NAMES.index(o.color) + 1
    return images, {"shape": shape_ids, "color": color_ids}


def load_vision_tower(model: Any, folder: Path) -> None:
    """Copy the CLIP vision tower saved in ``folder`` into ``model`` (a LLaVA), after checking that the two
    have the same geometry and width."""
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(folder)
    have, want = tower.config, model.config.vision_config
    keys = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "intermediate_size")
    mismatch = {k: (getattr(have, k), getattr(want, k)) for k in keys if getattr(have, k) != getattr(want, k)}
    if mismatch:
        raise ValueError(
            f"model.vision_init={str(folder)!r} is a tower of another shape than the model's "
            f"(folder, model): {mismatch}; pretrain one for this model size or use 'scratch'."
        )
    model.model.vision_tower.load_state_dict(tower.state_dict())
