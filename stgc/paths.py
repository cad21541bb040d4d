"""Paths written into result files: relative to the working directory when inside it, so that committed
results carry no machine-specific prefix (and stay valid in any clone)."""

from __future__ import annotations

import os
from pathlib import Path


def portable(path: str | os.PathLike) -> str:
    """``path`` relative to the current directory if it lies inside it, else as given."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
