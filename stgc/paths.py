"""Paths written into result files: relative to the working directory (or, failing that, to this source
checkout) when inside it, so that committed results carry no machine-specific prefix and stay valid in any
clone. Notebook kernels run in another working directory, hence the second base."""

from __future__ import annotations

import os
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]


def portable(path: str | os.PathLike) -> str:
    """``path`` relative to the current directory or the source checkout if inside one, else as given."""
    p = Path(path).resolve()
    for base in (Path.cwd().resolve(), _CHECKOUT):
        try:
            return str(p.relative_to(base))
        except ValueError:
            continue
    return str(path)
