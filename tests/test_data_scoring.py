"""lmms-eval's own scoring code on the mini suite: gold answers reach the maximum, a constant answer lands
where chance puts it, and the committed table (results/mini_suite/scoring_check.csv) is reproducible."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("lmms_eval")

from stgc.data.generate import eval_rows  # noqa: E402
from stgc.data.scoring_check import CONSTANT_ANSWER, scoring_check  # noqa: E402

DOCS = 120
GOLDEN = Path(__file__).resolve().parents[1] / "results" / "mini_suite" / "scoring_check.csv"


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return scoring_check(docs=DOCS, seed=0, image_size=64)


def _score(table: pd.DataFrame, benchmark: str, metric: str, column: str) -> float:
    sel = table[(table.benchmark == benchmark) & (table.metric == metric)]
    assert len(sel) == 1, (benchmark, metric)
    return float(sel[column].iloc[0])


def _rows(name: str) -> list[dict]:
    rows, _ = eval_rows(name, DOCS, 0, 64)
    return rows


def test_gold_answers_get_the_maximum_score(table: pd.DataFrame) -> None:
    maxima = {"mme_perception_score": 5 * 200.0, "mme_cognition_score": 2 * 200.0, "gpt_eval_score": 100.0}
    for _, r in table.iterrows():
        if r.metric == "pope_yes_ratio":  # the share of "yes" in the ground truth, not a score
            assert r.gold == pytest.approx(0.5)
            continue
        assert r.gold == pytest.approx(maxima.get(r.metric, 1.0)), (r.benchmark, r.metric)


def test_constant_answers_score_at_chance(table: pd.DataFrame) -> None:
    def const(b: str, m: str) -> float:
        return _score(table, b, m, "constant")

    # POPE: one yes + one no per image -> "yes" is right half the time, recall 1, precision 0.5, F1 2/3
    assert const("pope", "pope_accuracy") == pytest.approx(0.5)
    assert const("pope", "pope_recall") == pytest.approx(1.0)
    assert const("pope", "pope_precision") == pytest.approx(0.5)
    assert const("pope", "pope_f1_score") == pytest.approx(2 / 3, abs=1e-4)
    # MME: "yes" answers one of each pair -> acc 50, acc+ 0 -> 50 per category
    assert const("mme", "mme_perception_score") == pytest.approx(5 * 50.0)
    assert const("mme", "mme_cognition_score") == pytest.approx(2 * 50.0)
    # MMBench circular: "A" is right in exactly one of the 4 rotations -> never solved
    assert const("mmbench", "gpt_eval_score") == 0.0
    # ScienceQA: "A" scores the share of questions whose answer is the first choice (~1/2 or 1/3 per item)
    sqa = _rows("scienceqa_img")
    assert const("scienceqa_img", "exact_match") == pytest.approx(
        sum(r["answer"] == 0 for r in sqa) / len(sqa)
    )
    assert 0.25 <= const("scienceqa_img", "exact_match") <= 0.55
    # VizWiz: "unanswerable" scores exactly the share of degraded photos (about a third)
    viz = _rows("vizwiz")
    share = sum(r["category"] == "unanswerable" for r in viz) / len(viz)
    assert const("vizwiz", "exact_match") == pytest.approx(share) and 0.2 <= share <= 0.5
    # GQA: "no" scores the share of "no" answers; VQAv2: "yes" at most the share of yes/no questions
    gqa = _rows("gqa")
    assert const("gqa", "exact_match") == pytest.approx(sum(r["answer"] == "no" for r in gqa) / len(gqa))
    assert 0.05 <= const("vqav2", "exact_match") <= 0.4
    # open answers: nothing for a constant
    for b, m in [("textvqa", "exact_match"), ("chartqa", "relaxed_overall"), ("docvqa", "anls")]:
        assert const(b, m) <= 0.02, (b, m)


def test_every_benchmark_is_checked(table: pd.DataFrame) -> None:
    assert set(table.benchmark) == set(CONSTANT_ANSWER)
    assert set(table[table.benchmark == "chartqa"].metric) == {
        "relaxed_overall",
        "relaxed_human_split",
        "relaxed_augmented_split",
    }


def test_committed_table_is_reproducible() -> None:
    """The committed CSV was made from the default suite (docs=200, seed=0); answers do not depend on the
    image size, so a 64 px regeneration must reproduce it exactly."""
    golden = pd.read_csv(GOLDEN)
    again = scoring_check(docs=200, seed=0, image_size=64)
    pd.testing.assert_frame_equal(again.reset_index(drop=True), golden, check_dtype=False, atol=1e-4)


def test_default_metric_path_equals_lmms_eval_task(tmp_path: Path) -> None:
    """GQA and DocVQA have no process_results: the scoring check calls the registered metric the way
    lmms-eval's ConfigurableTask does. Hold it equal to a real Task built on a saved mini suite."""
    from lmms_eval.api.task import ConfigurableTask
    from lmms_eval.tasks.docvqa import utils as docvqa
    from lmms_eval.tasks.gqa import utils as gqa

    from stgc.data.scoring_check import _process_results
    from stgc.data.suite import generate_suite

    generate_suite(tmp_path / "s", docs=8, train_size=0, image_size=64, benchmarks=["gqa", "docvqa"])
    post = {
        "default": {"pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase."}
    }
    configs = {
        "gqa": ("testdev", gqa.gqa_doc_to_visual, gqa.gqa_doc_to_text, "answer",
                {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                 "ignore_case": True, "ignore_punctuation": True}),
        "docvqa": ("validation", docvqa.docvqa_doc_to_visual, docvqa.docvqa_doc_to_text, "answers",
                   {"metric": "anls", "aggregation": "mean", "higher_is_better": True}),
    }  # fmt: skip
    for name, (split, visual, text, target, metric) in configs.items():
        task = ConfigurableTask(
            config={
                "task": f"stgc_test_{name}",
                "dataset_path": str(tmp_path / "s" / name),
                "dataset_kwargs": {"load_from_disk": True},
                "test_split": split,
                "output_type": "generate_until",
                "doc_to_visual": visual,
                "doc_to_text": text,
                "doc_to_target": target,
                "metric_list": [metric],
                "lmms_eval_specific_kwargs": post,
            }
        )
        ours = _process_results(name)
        for doc in task.test_docs():
            gold = doc["answer"] if name == "gqa" else doc["answers"][0]
            for pred in (gold, "no", "0", gold.upper() + "."):
                expected = task.process_results(doc, [pred])[metric["metric"]]
                assert ours(dict(doc), [pred])[metric["metric"]] == pytest.approx(expected), (name, pred)
