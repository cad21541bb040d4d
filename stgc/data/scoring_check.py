"""Scoring check: feed gold answers and a constant answer through lmms-eval 0.7.3's own scoring code for
every mini benchmark. Gold must reach the maximum; the constant must land near chance. This proves the
generated rows carry what each task's ``process_results`` and aggregation read, and that the answer
formats are ones the scorers accept.

Nothing here re-implements a metric: per-row scores come from each task's ``process_results`` (or, for
tasks without one, the registered metric function lmms-eval would call: ``exact_match_hf_evaluate`` for
GQA, ``anls`` for DocVQA) and per-task scores from the task's aggregation function (``mean`` or its own).

Run: ``python -m stgc.data.scoring_check [--root data/mini] [--out results/mini_suite/scoring_check.csv]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd

from stgc.data.prompts import doc_to_target
from stgc.data.registry import BENCHMARKS

# The constant answer per benchmark and the score it should get (see the tests for the reasoning).
CONSTANT_ANSWER: dict[str, str] = {
    "vqav2": "yes",
    "gqa": "no",
    "vizwiz": "unanswerable",
    "scienceqa_img": "A",
    "textvqa": "yes",
    "chartqa": "0",
    "docvqa": "0",
    "pope": "yes",
    "mme": "yes",
    "mmbench": "A",
}


def _mean_metric(name: str) -> Callable[[list[dict], list[str]], dict[str, float]]:
    """Score with ``process_results`` then lmms-eval's ``mean`` aggregation, metric by metric."""
    from lmms_eval.api.metrics import mean

    def score(rows: list[dict], preds: list[str]) -> dict[str, float]:
        process = _process_results(name)
        per_metric: dict[str, list[float]] = {}
        for row, pred in zip(rows, preds):
            for key, value in process(copy.deepcopy(row), [pred]).items():
                if key != "submission":
                    per_metric.setdefault(key, []).append(value)
        return {k: float(mean(v)) for k, v in per_metric.items()}

    return score


def _process_results(name: str) -> Callable[[dict, list[str]], dict[str, Any]]:
    if name == "vqav2":
        from lmms_eval.tasks.vqav2.utils import vqav2_process_results_val

        return vqav2_process_results_val
    if name == "vizwiz":
        from lmms_eval.tasks.vizwiz_vqa.utils import vizwiz_vqa_process_results

        return vizwiz_vqa_process_results
    if name == "textvqa":
        from lmms_eval.tasks.textvqa.utils import textvqa_process_results

        return textvqa_process_results
    if name == "scienceqa_img":
        from lmms_eval.tasks.scienceqa.utils import sqa_process_results

        return sqa_process_results
    if name == "chartqa":
        from lmms_eval.tasks.chartqa.utils import chartqa_process_results

        return chartqa_process_results
    if name == "gqa":
        # gqa.yaml has no process_results: lmms-eval's Task calls the registered exact_match metric with the
        # YAML's kwargs (ignore_case, ignore_punctuation) on doc_to_target = "answer".
        from lmms_eval.api.metrics import exact_match_hf_evaluate

        def gqa(doc: dict, results: list[str]) -> dict[str, float]:
            return exact_match_hf_evaluate(
                predictions=[results[0].strip()],
                references=[doc["answer"]],
                ignore_case=True,
                ignore_punctuation=True,
            )

        return gqa
    if name == "docvqa":
        # docvqa_val has no process_results: the Task calls the registered anls metric on doc["answers"].
        from lmms_eval.api.metrics import anls

        def docvqa(doc: dict, results: list[str]) -> dict[str, float]:
            return anls(references=doc["answers"], predictions=[results[0].strip()])

        return docvqa
    raise AssertionError(name)


def _pope(rows: list[dict], preds: list[str]) -> dict[str, float]:
    from lmms_eval.tasks.pope import utils as pope

    aggs = {
        "pope_accuracy": pope.pope_aggregate_accuracy,
        "pope_precision": pope.pope_aggregate_precision,
        "pope_recall": pope.pope_aggregate_recall,
        "pope_f1_score": pope.pope_aggregate_f1_score,
        "pope_yes_ratio": pope.pope_aggregate_yes_ratio,
    }
    results = [pope.pope_process_results(copy.deepcopy(r), [p]) for r, p in zip(rows, preds)]
    out = {k: float(agg([res[k] for res in results])) for k, agg in aggs.items()}
    # MoE-LLaVA reports the mean F1 over the three POPE categories (pope_adv / pope_pop / pope_random)
    per_cat = []
    for cat in ("adversarial", "popular", "random"):
        sub = [res["pope_f1_score"] for res, r in zip(results, rows) if r["category"] == cat]
        per_cat.append(pope.pope_aggregate_f1_score(sub))
    out["f1_mean_over_categories"] = float(sum(per_cat) / len(per_cat))
    return out


def _mme(rows: list[dict], preds: list[str]) -> dict[str, float]:
    from lmms_eval.tasks.mme import utils as mme

    buckets: dict[str, list[dict]] = {"mme_perception_score": [], "mme_cognition_score": []}
    for r, p in zip(rows, preds):
        for key, value in mme.mme_process_results(copy.deepcopy(r), [p]).items():
            buckets[key].append(value)
    return {k: float(mme.mme_aggregate_results(v)) for k, v in buckets.items() if v}


def _mmbench(rows: list[dict], preds: list[str]) -> dict[str, float]:
    from lmms_eval.tasks.mmbench import en_utils

    results = [
        en_utils.mmbench_process_results(copy.deepcopy(r), [p])["gpt_eval_score"] for r, p in zip(rows, preds)
    ]
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        # the aggregation writes its details under args.output_path/submissions: keep that in a temp folder
        score = en_utils.mmbench_aggregate_dev_results_static(results, SimpleNamespace(output_path=tmp))
    return {"gpt_eval_score": float(score)}


SCORERS: dict[str, Callable[[list[dict], list[str]], dict[str, float]]] = {
    "vqav2": _mean_metric("vqav2"),
    "gqa": _mean_metric("gqa"),
    "vizwiz": _mean_metric("vizwiz"),
    "scienceqa_img": _mean_metric("scienceqa_img"),
    "textvqa": _mean_metric("textvqa"),
    "chartqa": _mean_metric("chartqa"),
    "docvqa": _mean_metric("docvqa"),
    "pope": _pope,
    "mme": _mme,
    "mmbench": _mmbench,
}


def _rows_from_suite(root: Path, name: str) -> list[dict]:
    from stgc.data.suite import load_benchmark

    ds = load_benchmark(root, name)
    return ds.remove_columns("image").to_list()


def _rows_generated(name: str, docs: int, seed: int, image_size: int) -> list[dict]:
    """Rows as a saved suite holds them (through the Arrow schema), images dropped."""
    from datasets import Dataset

    from stgc.data.generate import eval_rows

    rows, _ = eval_rows(name, docs, seed, image_size)
    features = BENCHMARKS[name].features.copy()
    del features["image"]
    return Dataset.from_list(
        [{k: v for k, v in r.items() if k != "image"} for r in rows], features=features
    ).to_list()


def scoring_check(
    root: str | Path | None = None,
    *,
    docs: int = 200,
    seed: int = 0,
    image_size: int = 64,
    benchmarks: list[str] | None = None,
) -> pd.DataFrame:
    """One row per (benchmark, metric): score of the gold answers, score of the constant answer.

    With ``root`` the rows come from a generated suite folder; otherwise they are generated in memory
    (``docs`` per benchmark; the image size does not change any answer).
    """
    from loguru import logger

    records = []
    logger.disable("lmms_eval")  # MME's aggregation logs every category score; the table holds them
    try:
        records = _score_all(root, docs, seed, image_size, benchmarks)
    finally:
        logger.enable("lmms_eval")
    return pd.DataFrame.from_records(records)


def _score_all(root, docs, seed, image_size, benchmarks) -> list[dict[str, Any]]:
    records = []
    for name in benchmarks or list(BENCHMARKS):
        rows = _rows_from_suite(Path(root), name) if root else _rows_generated(name, docs, seed, image_size)
        gold = SCORERS[name](rows, [doc_to_target(name, r) for r in rows])
        const = SCORERS[name](rows, [CONSTANT_ANSWER[name]] * len(rows))
        for metric in gold:
            records.append(
                {
                    "benchmark": name,
                    "lmms_task": BENCHMARKS[name].lmms_task,
                    "metric": metric,
                    "rows": len(rows),
                    "gold": round(gold[metric], 4),
                    "constant_answer": CONSTANT_ANSWER[name],
                    "constant": round(const.get(metric, float("nan")), 4),
                }
            )
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="a generated suite folder (default: generate in memory)")
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/mini_suite/scoring_check.csv")
    args = parser.parse_args(argv)
    table = scoring_check(args.root, docs=args.docs, seed=args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
