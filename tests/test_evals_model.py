"""The lmms-eval model adapter on a tiny random checkpoint: registration, batched == batch-1 answers,
stop strings and max_new_tokens, loglikelihood, routing capture, bad checkpoints."""

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


def test_batched_generation_equals_batch_one_and_capture(checkpoint, task_dir, tmp_path):
    one = _evaluate(StgcMoeLlava(pretrained=str(checkpoint), batch_size=1), task_dir, tmp_path)
    cap = tmp_path / "capture"
    four = _evaluate(
        StgcMoeLlava(pretrained=str(checkpoint), batch_size=4, capture_routing=str(cap)), task_dir, tmp_path
    )
    assert one == four
    assert sum(len(v) for v in one.values()) == 12 and any(r.strip() for v in one.values() for r in v)

    payload = torch.load(cap / "routing_rank0.pt")
    assert payload["format"] == "stgc-routing-capture" and payload["version"] == 2
    assert payload["moe_layers"] == [0, 2] and payload["num_experts"] == 4 and payload["top_k"] == 2
    samples = payload["samples"]
    assert sorted((s["task"], s["doc_id"]) for s in samples) == sorted(
        (t, i) for t in TASKS for i in range(4)
    )
    for s in samples:
        S = s["input_ids"].shape[0]
        assert s["is_image"].shape == (S,) and s["is_image"].any()
        assert s["topk_idx"].shape == (2, S, 2) and s["topk_idx"].dtype == torch.int16
        assert s["topk_weights"].shape == (2, S, 2) and s["probs"].shape == (2, S, 4)
        assert torch.allclose(s["probs"].sum(-1), torch.ones(2, S), atol=1e-5)
        # the generated answer's routing follows the prompt's: is_answer is one contiguous suffix
        n_ans = int(s["is_answer"].sum())
        assert s["is_answer"].shape == (S,) and not s["is_answer"][: S - n_ans].any()
        assert not (s["is_answer"] & s["is_image"]).any()
    assert any(s["is_answer"].any() for s in samples)
    assert len({s["input_ids"].shape[0] for s in samples}) > 1


def test_capture_during_generation_equals_a_full_forward(checkpoint, tmp_path):
    """The routing read from generate()'s own forwards (prefill + KV-cache decode steps) equals the routing
    of one forward over prompt + answer: capture needs no extra pass and records the same thing."""
    from PIL import Image

    lm = StgcMoeLlava(pretrained=str(checkpoint), batch_size=1, capture_routing=str(tmp_path / "cap"))
    doc = {"image": Image.new("RGB", (8, 8), (200, 10, 10))}
    lm.generate_until(_requests(lm, doc, {"max_new_tokens": 6, "until": []}))
    s = lm._captured[0]
    inputs = lm._inputs([lm._prompt("What colour is the square?", 1)], [[doc["image"]]])
    ids = s["input_ids"][None].to(inputs["input_ids"].device)
    with torch.inference_mode():
        out = lm.model(
            input_ids=ids,
            pixel_values=inputs["pixel_values"],
            attention_mask=torch.ones_like(ids),
            output_routing=True,
        )
    full = torch.stack([r.topk_idx_TK for r in out.routing_records]).to(torch.int16)  # L, S, K
    assert s["is_answer"].any()
    assert torch.equal(full, s["topk_idx"])


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
