"""What a sweep is and the named sweeps: ``Sweep`` (methods x seeds x tasks, the baseline, where its runs
live), its ``EvalSettings``, and the registry ``SWEEPS`` (``get_sweep``). A sweep is defined like a recipe:
a Python function returning a ``Sweep``. ``evals.sweep`` runs them and re-exports these names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evals import tasks as T


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How every cell is evaluated (evals.run.evaluate's arguments). source / mini_root None: the
    environment's (STGC_EVAL_SOURCE, STGC_MINI_ROOT), resolved when the sweep runs."""

    batch_size: int = 8
    limit: int | None = None
    source: str | None = None
    mini_root: str | None = None
    gen_kwargs: str | None = None
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """methods: label -> the method's training config (a stgc.recipes.RunConfig; its seed and output folder
    are set per cell). baseline: the label deltas and paired tests are taken against."""

    name: str
    methods: dict[str, Any]
    seeds: tuple[int, ...]
    tasks: tuple[str, ...]
    baseline: str = "baseline"
    eval: EvalSettings = dataclasses.field(default_factory=EvalSettings)
    runs_root: str | None = None

    def __post_init__(self) -> None:
        if not self.methods or not self.seeds:
            raise ValueError(f"sweep {self.name!r} needs at least one method and one seed")
        if self.baseline not in self.methods:
            raise ValueError(
                f"sweep {self.name!r}: baseline {self.baseline!r} is not one of its methods "
                f"{list(self.methods)}"
            )
        object.__setattr__(self, "tasks", tuple(T.expand_tasks(list(self.tasks))))
        for label in self.methods:
            if not label or "/" in label or label.startswith("."):
                raise ValueError(f"method label {label!r} must be a plain folder name")

    def run_dir(self, method: str, seed: int) -> Path:
        return Path(self.runs_root or Path("runs") / self.name) / f"{method}-seed{seed}"

    def run_config(self, method: str, seed: int) -> Any:
        """The RunConfig of one (method, seed): the method's config with the seed and the run folder set."""
        base = self.methods[method]
        return base.replace(
            training=base.training.replace(seed=seed), output_dir=str(self.run_dir(method, seed))
        )


def tiny_sweep() -> Sweep:
    """Baseline vs STGC on the tiny recipe (CPU), seeds 0 and 1, the ten mini benchmarks under the
    MoE-LLaVA protocol."""
    from stgc.recipes import stgc_variant, tiny

    return Sweep(
        name="tiny",
        methods={"baseline": tiny(), "stgc": stgc_variant(tiny())},
        seeds=(0, 1),
        tasks=T.SUITES[T.MOE_LLAVA],
    )


def peers_sweep() -> Sweep:
    """The baseline, STGC and every peer method preset (``stgc.objectives.config.METHODS`` but ``z_loss``,
    the worked example of docs/extending.md), each alone and with STGC on top, on the tiny recipe, seeds 0
    and 1, the ten mini benchmarks under the MoE-LLaVA protocol;
    its runs share the tiny sweep's folder for the methods they have in common (``runs/tiny``)."""
    from stgc.objectives.config import METHODS
    from stgc.recipes import get_recipe

    methods = {"baseline": get_recipe("tiny"), "stgc": get_recipe("tiny_stgc")}
    for name in METHODS:
        if name not in ("baseline", "stgc", "z_loss"):
            methods[name] = get_recipe(f"tiny_{name}")
            methods[f"{name}+stgc"] = get_recipe(f"tiny_{name}_stgc")
    return Sweep(
        name="peers", methods=methods, seeds=(0, 1), tasks=T.SUITES[T.MOE_LLAVA], runs_root="runs/tiny"
    )


SWEEPS: dict[str, Callable[[], Sweep]] = {"tiny": tiny_sweep, "peers": peers_sweep}


def get_sweep(name: str) -> Sweep:
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; valid sweeps: {', '.join(sorted(SWEEPS))}")
    return SWEEPS[name]()
