"""What a constant answer scores on the mini suite: the floor every model must beat, as a row of the
sweep's tables. The scores come from the suite's scoring check (``stgc.data.scoring_check``: lmms-eval's
own scoring of a fixed answer to every question), one per task's headline metric."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

CONSTANT_NAME = "constant_answer.csv"
REFERENCE_LABEL = "constant answer"


def constant_answer_scores(data: Path, tasks: Sequence[str], path: Path) -> dict[str, float]:
    """The constant answer's headline score for each of `tasks` on the suite in `data` (written to `path`
    as CSV: task, benchmark, metric, constant_answer, score)."""
    import pandas as pd

    from evals import tasks as T
    from stgc.data.scoring_check import scoring_check
    from stgc.logs import quiet_output

    with quiet_output():
        check = scoring_check(data, benchmarks=T.benchmarks_of(list(tasks)))
    # the check scores lmms-eval's metric names; a group's headline (POPE's mean F1 over its categories) is
    # the check's mean over categories
    aliases = {"pope_f1_score": "f1_mean_over_categories"}
    rows = []
    for task in tasks:
        info = T.TASKS[task]
        metric = aliases.get(info.headline, info.headline) if info.subtasks else info.headline
        hit = check[(check["benchmark"] == info.benchmark) & (check["metric"] == metric)]
        if len(hit):
            rows.append(
                {
                    "task": task,
                    "benchmark": info.benchmark,
                    "metric": metric,
                    "constant_answer": hit["constant_answer"].iloc[0],
                    "score": float(hit["constant"].iloc[0]),
                }
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["task", "benchmark", "metric", "constant_answer", "score"]).to_csv(
        path, index=False
    )
    return {r["task"]: r["score"] for r in rows}
