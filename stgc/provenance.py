"""Provenance stamped on every result (docs/architecture.md, Conventions): the source revision results were
produced with."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_revision(path: str | os.PathLike | None = None) -> str:
    """Short commit hash of the checkout (+"-dirty" with uncommitted changes to tracked files); the
    ``STGC_GIT_REVISION`` environment variable overrides it (e.g. on a machine given a copy without .git);
    "unknown" outside a git checkout."""
    if os.environ.get("STGC_GIT_REVISION"):
        return os.environ["STGC_GIT_REVISION"]
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{rev}-dirty" if dirty else rev
