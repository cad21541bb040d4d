"""A sweep's results folder: where each input of the report lies, and how to find the training runs.

Layout (what `stgc sweep`, `stgc analyze` and `stgc report` write; only scores.csv is required):

    results/<sweep>/
        scores.csv            long scores (evals.tables.LONG_COLUMNS)             stgc sweep
        table.csv             wide table (mean ± std over seeds, deltas, p)       stgc sweep
        sweep.json            the resolved sweep (methods, seeds, runs_root)      stgc sweep
        runs.json             optional manifest of training runs (below)
        routing/*.parquet     routing traces, one file per checkpoint            stgc analyze capture
        conflict/*.parquet    per-(token, expert) conflict scores, one per ckpt  stgc analyze conflict
        reports/              executed notebooks, HTML, figures/*.png, tables/*.csv   stgc report

Training runs (their metrics.jsonl gives the conflict curves) are found, first match wins:
1. an explicit runs folder (`stgc report --runs-dir`): every `<dir>/**/metrics.jsonl`;
2. `runs.json`: a list of {"run_dir": ..., "method": ..., "seed": ...} (or {"runs": [...]});
3. `sweep.json`: `<runs_root>/<method>-seed<seed>` for every method and seed (evals.sweep's run folders);
4. the `checkpoint` column of scores.csv: the folder holding each checkpoint (runs/<run>/checkpoint-N).
Relative paths are tried against the current folder and the project folder of the results (the parent of
`results/`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pandas as pd

SCORES_NAME, TABLE_NAME, SWEEP_NAME, RUNS_NAME = "scores.csv", "table.csv", "sweep.json", "runs.json"
# `stgc report` renders into a folder inside the results folder and names it here for the notebooks'
# kernels (analysis.report); it applies to the results folder that holds it, only
REPORTS_ENV = "STGC_REPORTS_DIR"
METRICS_NAME = "metrics.jsonl"  # stgc.callbacks.METRICS_NAME
RESULTS_ENV = "STGC_RESULTS_ROOT"


class ResultsError(ValueError):
    """A results folder is missing or holds no sweep (one line naming the folder and the fix)."""


@dataclasses.dataclass(frozen=True)
class ResultsFolder:
    path: Path
    runs_dir: Path | None = None

    scores_csv = property(lambda self: self.path / SCORES_NAME)
    table_csv = property(lambda self: self.path / TABLE_NAME)
    sweep_json = property(lambda self: self.path / SWEEP_NAME)
    runs_json = property(lambda self: self.path / RUNS_NAME)
    routing_dir = property(lambda self: self.path / "routing")
    conflict_dir = property(lambda self: self.path / "conflict")
    figures_dir = property(lambda self: self.reports_dir / "figures")
    tables_dir = property(lambda self: self.reports_dir / "tables")

    @property
    def reports_dir(self) -> Path:
        """reports/, or the folder `stgc report` renders into while it runs (REPORTS_ENV)."""
        rendering = os.environ.get(REPORTS_ENV)
        if rendering and Path(rendering).parent.resolve() == self.path.resolve():
            return Path(rendering)
        return self.path / "reports"

    def trace_files(self) -> list[Path]:
        return sorted(self.routing_dir.glob("*.parquet")) if self.routing_dir.is_dir() else []

    def conflict_files(self) -> list[Path]:
        return sorted(self.conflict_dir.glob("*.parquet")) if self.conflict_dir.is_dir() else []

    def project_dir(self) -> Path:
        """The folder relative paths of the sweep were written from: the parent of `results/`."""
        return self.path.parent.parent if self.path.parent.name == "results" else self.path.parent

    def resolve(self, path: str | os.PathLike) -> Path:
        """A path from a results file (absolute, or relative to the cwd or the project folder)."""
        path = Path(path)
        if path.is_absolute():
            return path
        for base in (Path.cwd(), self.project_dir()):
            if (base / path).exists():
                return (base / path).resolve()
        return (self.project_dir() / path).resolve()


def results_roots() -> list[Path]:
    """Folders searched for sweeps: $STGC_RESULTS_ROOT, else `results/` in the current folder or one of its
    parents (a notebook runs in notebooks/), then the project's own `results/`."""
    if os.environ.get(RESULTS_ENV):
        return [Path(os.environ[RESULTS_ENV])]
    here = Path.cwd().resolve()
    roots = [base / "results" for base in (here, *here.parents)]
    roots.append(Path(__file__).resolve().parents[1] / "results")
    return list(dict.fromkeys(r for r in roots if r.is_dir()))


def latest_results_dir(root: str | os.PathLike | None = None) -> Path:
    """The results folder whose scores.csv is newest, under `root` (default: the first of `results_roots()`
    that holds a sweep, so that the nearest results/ wins over the project's)."""
    roots = [Path(root)] if root is not None else results_roots()
    candidates: list[Path] = []
    for folder in roots:
        candidates = [p.parent for p in folder.glob(f"*/{SCORES_NAME}")]
        if candidates:
            break
    if not candidates:
        where = ", ".join(str(r) for r in roots) or "results/ (none found from the current folder)"
        raise ResultsError(
            f"no results folder with a {SCORES_NAME} under {where}; run a sweep first (`stgc sweep`) or pass "
            "the results folder explicitly"
        )
    return max(candidates, key=lambda p: (p / SCORES_NAME).stat().st_mtime).resolve()


def open_results(
    results_dir: str | os.PathLike | None = None, runs_dir: str | os.PathLike | None = None
) -> ResultsFolder:
    """The results folder (default: the newest one); ResultsError unless it exists and holds scores.csv."""
    path = Path(results_dir) if results_dir is not None else latest_results_dir()
    if not path.is_dir():
        raise ResultsError(
            f"results folder {path} does not exist; pass the folder a sweep wrote (results/<sweep>)"
        )
    if not (path / SCORES_NAME).is_file():
        raise ResultsError(
            f"results folder {path} has no {SCORES_NAME}, so no sweep has written it; run `stgc sweep` into "
            "it or pass the folder of a finished sweep"
        )
    if runs_dir is not None and not Path(runs_dir).is_dir():
        raise ResultsError(f"runs folder {runs_dir} does not exist; pass the folder holding the run folders")
    return ResultsFolder(path.resolve(), Path(runs_dir).resolve() if runs_dir is not None else None)


def load_scores(folder: ResultsFolder) -> pd.DataFrame:
    from evals.tables import check_long

    scores = pd.read_csv(folder.scores_csv)
    try:
        check_long(scores)
    except ValueError as error:
        raise ResultsError(f"{folder.scores_csv}: {error}") from None
    return scores


def checkpoint_labels(folder: ResultsFolder) -> dict[str, tuple[str, int | None]]:
    """Resolved checkpoint path -> (method label, seed) from scores.csv: the sweep's labels name traces and
    conflict files of the same checkpoints (their own metadata has the routing method's name)."""
    scores = pd.read_csv(folder.scores_csv, usecols=["method", "seed", "checkpoint"]).drop_duplicates()
    out = {}
    for row in scores.itertuples(index=False):
        if isinstance(row.checkpoint, str) and row.checkpoint:
            seed = None if pd.isna(row.seed) else int(row.seed)
            out[str(folder.resolve(row.checkpoint))] = (str(row.method), seed)
    return out


def find_runs(folder: ResultsFolder) -> pd.DataFrame:
    """Training runs: columns run, method, seed, metrics (path), found_by, exists (metrics.jsonl is there).

    See the module docstring for the order of the sources; method / seed are None where the source does
    not say (the metrics records' own "method" key then names the method). Runs a source lists whose
    metrics.jsonl is missing are kept with exists=False, so that a report can say which are missing."""
    rows: list[dict] = []
    if folder.runs_dir is not None:
        for metrics in sorted(folder.runs_dir.rglob(METRICS_NAME)):
            rows.append(_run_row(metrics.parent, None, None, "runs folder"))
        return _runs_frame(rows)
    if folder.runs_json.is_file():
        data = json.loads(folder.runs_json.read_text())
        entries = data.get("runs", []) if isinstance(data, dict) else data
        for entry in entries:
            run_dir = folder.resolve(entry.get("run_dir") or Path(entry["metrics"]).parent)
            rows.append(_run_row(run_dir, entry.get("method"), entry.get("seed"), RUNS_NAME))
    elif folder.sweep_json.is_file():
        sweep = json.loads(folder.sweep_json.read_text())
        root = folder.resolve(sweep["runs_root"])
        for method in sweep.get("methods", {}):
            for seed in sweep.get("seeds", []):
                rows.append(_run_row(root / f"{method}-seed{seed}", method, seed, SWEEP_NAME))
    else:
        scores = pd.read_csv(folder.scores_csv, usecols=["method", "seed", "checkpoint"]).drop_duplicates()
        for row in scores.itertuples(index=False):
            if isinstance(row.checkpoint, str) and row.checkpoint:
                seed = None if pd.isna(row.seed) else int(row.seed)
                rows.append(_run_row(folder.resolve(row.checkpoint).parent, row.method, seed, SCORES_NAME))
    return _runs_frame(rows)


def _run_row(run_dir: Path, method, seed, found_by: str) -> dict:
    return {
        "run": run_dir.name,
        "method": method,
        "seed": None if seed is None else int(seed),
        "metrics": str(run_dir / METRICS_NAME),
        "found_by": found_by,
        "exists": (run_dir / METRICS_NAME).is_file(),
    }


def _runs_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["run", "method", "seed", "metrics", "found_by", "exists"])
    frame["seed"] = frame["seed"].astype("Int64")
    return frame.drop_duplicates("metrics", ignore_index=True)
