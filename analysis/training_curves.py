"""Training curves of several runs from their metrics.jsonl (figure -> function -> data:
results/training/README.md): conflict and routing statistics per step and layer, raw and binned.

    python -c "import glob; from analysis.training_curves import write_training_curves; \\
      write_training_curves(sorted(glob.glob('runs/tiny-*-seed*/metrics.jsonl')), 'results/training')"
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def training_curves(metrics_files: Sequence[str | Path], *, bin_steps: int = 25):
    """(raw, binned) long tables of the conflict and routing curves of several runs' metrics.jsonl.

    Columns: run, method, step, layer, scope, stat, value. raw: every measured step and layer
    (``analysis.metrics.read_conflict_curves``, plus ``routing/layer{i}/{entropy,imbalance}`` in the same
    form). binned: each run's values averaged over consecutive windows of ``bin_steps`` optimizer steps
    (step = the window's last step), so that a run measured every step (STGC) and one measured every
    ``measure_conflict_every`` steps (the baseline) share the x positions and batch noise is averaged.
    """
    import pandas as pd

    from analysis.metrics import conflict_curves, read_metrics_jsonl

    tables = []
    for path in metrics_files:
        path = Path(path)
        long = read_metrics_jsonl(path, run=path.parent.name)
        routing = long[long["key"].str.match(r"^routing/layer\d+/(entropy|imbalance)$")].copy()
        routing["key"] = routing["key"].str.replace("routing/", "conflict/", n=1)  # same parser below
        tables.append(conflict_curves(long))
        tables.append(conflict_curves(routing))
    raw = pd.concat(tables, ignore_index=True)
    if bin_steps < 1:
        raise ValueError(f"bin_steps={bin_steps} must be >= 1")
    binned = raw.assign(step=((raw["step"] - 1) // bin_steps + 1) * bin_steps)
    keys = ["run", "method", "step", "layer", "scope", "stat"]
    binned = binned.groupby(keys, as_index=False, dropna=False)["value"].mean()
    return raw, binned


def write_training_curves(
    metrics_files: Sequence[str | Path], out_dir: str | Path, *, bin_steps: int = 25
) -> list[Path]:
    """training_curves.csv (raw), training_curves_binned.csv, conflict_curves.png (fraction and mean
    cosine, mean over MoE layers, ±1 s.d. over runs of a method) and routing_curves.png (entropy and
    load imbalance) under ``out_dir``."""
    from analysis.figures import plot_conflict_curves, save_figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw, binned = training_curves(metrics_files, bin_steps=bin_steps)
    paths = [out_dir / "training_curves.csv", out_dir / "training_curves_binned.csv"]
    raw.to_csv(paths[0], index=False, float_format="%.6g")
    binned.to_csv(paths[1], index=False, float_format="%.6g")
    fig = plot_conflict_curves(binned, stats=("fraction", "mean_cos"))
    fig.suptitle(f"Token gradient conflict during training (mean over MoE layers, {bin_steps}-step means)")
    paths.append(save_figure(fig, out_dir / "conflict_curves.png"))
    fig = plot_conflict_curves(binned, stats=("entropy", "imbalance"))
    fig.suptitle(f"Routing during training (mean over MoE layers, {bin_steps}-step means)")
    paths.append(save_figure(fig, out_dir / "routing_curves.png"))
    return paths
