"""The ``Section`` a report section function returns (notes, tables and figures of one notebook, written to
disk as they are added, displayed with ``.show()``), its missing-input note (``MISSING``) and the helpers
every section uses (``mean_over_seeds``). The section functions are in ``analysis.sections``."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from analysis import figures as F
from analysis.results import ResultsFolder

MISSING = "**Missing input:**"


@dataclasses.dataclass
class Section:
    """Notes, tables and figures of one notebook, in display order; tables and figures are written to disk
    when added."""

    title: str
    folder: ResultsFolder
    items: list[tuple[str, Any]] = dataclasses.field(default_factory=list)

    def note(self, text: str) -> None:
        self.items.append(("note", text))

    def missing(self, text: str) -> None:
        self.items.append(("note", f"{MISSING} {text}"))

    def table(self, name: str, table: pd.DataFrame, caption: str) -> pd.DataFrame:
        path = self.folder.tables_dir / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(path, index=False, float_format="%.6g")
        self.items.append(("table", (caption, table, path)))
        return table

    def figure(self, name: str, fig, caption: str) -> Path:
        path = F.save_figure(fig, self.folder.figures_dir / f"{name}.png")
        self.items.append(("figure", (caption, path)))
        return path

    @property
    def figure_paths(self) -> list[Path]:
        return [value[1] for kind, value in self.items if kind == "figure"]

    @property
    def notes(self) -> list[str]:
        return [value for kind, value in self.items if kind == "note"]

    def show(self) -> None:
        """Display every item (in a notebook: Markdown, HTML tables, the saved PNGs)."""
        from IPython.display import Image, Markdown, display

        display(Markdown(f"## {self.title}\nResults folder: `{self.folder.path}`"))
        for kind, value in self.items:
            if kind == "note":
                display(Markdown(value))
            elif kind == "table":
                caption, table, path = value
                display(Markdown(f"**{caption}** (`{path.name}`)"))
                with pd.option_context(
                    "display.precision", 3, "display.max_columns", 60, "display.width", 200
                ):
                    display(table)
            else:
                caption, path = value
                display(Markdown(f"**{caption}** (`{path.name}`)"))
                display(Image(filename=str(path)))

    def __repr__(self) -> str:
        counts = {k: sum(1 for kind, _ in self.items if kind == k) for k in ("note", "table", "figure")}
        return f"Section({self.title!r}, {counts})"


def _slug(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "x"


def mean_over_seeds(table: pd.DataFrame, keys: Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """Mean and sample std (ddof=1; NaN with one seed) of `values` over the rows of each `keys` group, with
    n_seeds = number of rows (one per checkpoint)."""
    grouped = table.groupby(list(keys), sort=True, dropna=False)
    out = grouped.size().rename("n_seeds").reset_index()
    for value in values:
        stats = grouped[value].agg(["mean", "std"]).reset_index(drop=True)
        out[f"{value}_mean"], out[f"{value}_std"] = stats["mean"].to_numpy(), stats["std"].to_numpy()
    return out
