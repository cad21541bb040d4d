"""The lmms-eval model adapter on a tiny random checkpoint: registration, batched == batch-1 answers,
stop strings and max_new_tokens, loglikelihood, bad checkpoints."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from evals import tasks as T
from evals.checkpoint import check_checkpoint
from evals.lmms_model import MODEL_NAME, StgcMoeLlava, _cut_at
from evals.testing import write_tiny_checkpoint, write_tiny_suite

TASKS = ["stgc_gqa", "stgc_pope_moellava_adv", "stgc_scienceqa_img"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint-0")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("suite")
    root = write_tiny_suite(tmp / "mini", n=4, names=["gqa", "pope", "scienceqa_img"])
    return T.write_task_dir(tmp / "tasks", source="mini", mini_root=root)


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model, list_available_models

    assert MODEL_NAME in list_available_models()
    assert get_model(MODEL_NAME) is StgcMoeLlava


def _evaluate(lm, task_dir, tmp_path):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    args = argparse.Namespace(output_path=str(tmp_path), process_with_media=False)
    res = simple_evaluate(
        model=lm,
        tasks=TASKS,
        task_manager=manager,
        cli_args=args,
        bootstrap_iters=0,
        gen_kwargs="max_new_tokens=6",
    )
    return {
        t: [s["resps"][0][0] for s in sorted(v, key=lambda s: s["doc_id"])] for t, v in res["samples"].items()
    }


def test_batched_generation_equals_batch_one(checkpoint, task_dir, tmp_path):
    one = _evaluate(StgcMoeLlava(pretrained=str(checkpoint), batch_size=1), task_dir, tmp_path)
    four = _evaluate(StgcMoeLlava(pretrained=str(checkpoint), batch_size=4), task_dir, tmp_path)
    assert one == four
    assert sum(len(v) for v in one.values()) == 12 and any(r.strip() for v in one.values() for r in v)


def _requests(lm, doc, gen_kwargs):
    lm.task_dict = {"t": {"test": [doc]}}
    args = ("What colour is the square?", gen_kwargs, lambda d: [d["image"]], 0, "t", "test")
    return [SimpleNamespace(args=args)]


def test_until_and_max_new_tokens(checkpoint):
    from PIL import Image

    lm = StgcMoeLlava(pretrained=str(checkpoint), batch_size=1)
    doc = {"image": Image.new("RGB", (8, 8), (200, 10, 10))}
    free = lm.generate_until(_requests(lm, doc, {"max_new_tokens": 12, "until": []}))[0]
    assert len(free) > 4
    stop = free[2:4]
    cut = lm.generate_until(_requests(lm, doc, {"max_new_tokens": 12, "until": [stop]}))[0]
    assert cut == free[: free.find(stop)]
    short = lm.generate_until(_requests(lm, doc, {"max_new_tokens": 2}))[0]
    assert len(lm.tokenizer(short, add_special_tokens=False)["input_ids"]) <= 2
    assert _cut_at("yes. no\n\nmore", ["\n\n", "."]) == "yes"


def test_loglikelihood_is_the_sum_of_continuation_logprobs(checkpoint):
    from PIL import Image

    lm = StgcMoeLlava(pretrained=str(checkpoint), batch_size=1)
    doc = {"image": Image.new("RGB", (8, 8), (10, 10, 200)), "answer": "blue"}
    lm.task_dict = {"t": {"test": [doc]}}
    req = SimpleNamespace(
        args=("What colour?", lambda d: d["answer"], lambda d: [d["image"]], 0, "t", "test")
    )
    ((logprob, greedy),) = lm.loglikelihood([req])
    prompt = lm._prompt("What colour?", 1)
    full = lm._prompt("What colour?", 1, continuation="blue")
    assert full.startswith(prompt) and full.endswith("blue")
    inputs = lm._inputs([full], [[doc["image"]]])
    n = lm._inputs([prompt], [[doc["image"]]])["input_ids"].shape[1]
    with torch.no_grad():
        logits = lm.model(**inputs).logits[0]
    ids = inputs["input_ids"][0]
    expected = sum(torch.log_softmax(logits[i - 1], -1)[ids[i]].item() for i in range(n, ids.shape[0]))
    assert logprob == pytest.approx(expected, abs=1e-4) and logprob < 0
    assert isinstance(greedy, bool)


def test_bad_checkpoints(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="does not exist"):
        check_checkpoint(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        check_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="holds a 'llava' model"):
        check_checkpoint(tmp_path)
    from evals.lmms_model import AdapterInputError

    with pytest.raises(AdapterInputError, match="unknown model_args"):
        StgcMoeLlava(pretrained=str(checkpoint), temperature=1)
    with pytest.raises(AdapterInputError, match="holds a 'llava' model"):
        StgcMoeLlava(pretrained=str(tmp_path))
