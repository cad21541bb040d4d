"""`stgc eval` / evals.run: an end-to-end run on a tiny checkpoint, and one clear line for each bad input."""

from __future__ import annotations

import json

import pytest

from evals import tasks as T
from evals.run import load_results
from evals.testing import write_tiny_checkpoint, write_tiny_suite
from stgc.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    ckpt = write_tiny_checkpoint(tmp / "runs" / "r1" / "checkpoint-5")
    root = write_tiny_suite(tmp / "mini", n=4)
    return tmp, ckpt, root


def test_stgc_eval_end_to_end(setup, capsys):
    tmp, ckpt, root = setup
    tasks = "stgc_pope_moellava,stgc_mme,stgc_docvqa_val"
    rc = main(["eval", str(ckpt), "--tasks", tasks, "--mini-root", str(root), "--batch-size", "2",
               "--max-new-tokens", "4", "--limit", "4"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "stgc_pope_moellava" in out and "pope_f1_score" in out and "[moe-llava]" in out
    eval_dir = tmp / "runs" / "r1" / "eval" / "checkpoint-5"  # the default output folder
    results = load_results(eval_dir)
    assert results["stgc"]["tasks"] == tasks.split(",") and results["stgc"]["source"] == "mini"
    assert results["stgc"]["protocols"]["stgc_mme"] == "lmms-eval"
    assert results["config"]["limit"] == 4
    for task in ("stgc_pope_moellava_adv", "stgc_mme", "stgc_docvqa_val"):
        lines = (eval_dir / f"samples_{task}.jsonl").read_text().splitlines()
        assert len(lines) == 4 and "resps" in json.loads(lines[0])
    assert (eval_dir / "tasks" / "stgc_mme.yaml").is_file()

    from evals.run import scores_from_results

    scores = scores_from_results(results, method="baseline", seed=0)
    assert set(scores["task"]) == set(tasks.split(","))
    pope = scores[(scores["task"] == "stgc_pope_moellava") & (scores["metric"] == "pope_f1_score")]
    assert len(pope) == 1 and pope["n"].iloc[0] == 12 and pope["task_version"].iloc[0] == "1.0/mini"
    assert scores["method"].eq("baseline").all() and scores["git_revision"].ne("").all()


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    return lines[0]


def test_bad_inputs_one_line_each(setup, tmp_path, capsys):
    _, ckpt, root = setup
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "does not exist" in _error_line(capsys)

    assert main(["eval", str(tmp_path)]) == 2
    assert "no config.json" in _error_line(capsys)

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert main(["eval", str(tmp_path)]) == 2
    assert "holds a 'llava' model" in _error_line(capsys)

    assert main(["eval", str(ckpt), "--tasks", "stgc_gqa,vqav2", "--mini-root", str(root)]) == 2
    line = _error_line(capsys)
    assert "unknown task(s) vqav2" in line and "stgc_vqav2_val" in line

    assert main(["eval", str(ckpt), "--tasks", "stgc_gqa", "--mini-root", str(tmp_path / "nosuite")]) == 2
    line = _error_line(capsys)
    assert "gqa does not exist" in line and "stgc data" in line

    broken = write_tiny_suite(tmp_path / "broken", n=2, names=["pope"])
    from datasets import load_from_disk

    pope = load_from_disk(str(broken / "pope"))
    pope = pope.remove_columns("category")
    pope.save_to_disk(str(tmp_path / "broken2" / "pope"))
    capsys.readouterr()  # drop the progress bars of the writes above
    assert main(["eval", str(ckpt), "--tasks", "stgc_pope", "--mini-root", str(tmp_path / "broken2")]) == 2
    assert "category" in _error_line(capsys)

    assert main(["eval", str(ckpt), "--tasks", "stgc_mme", "--mini-root", str(root), "--limit", "3"]) == 2
    assert "split MME's question pairs" in _error_line(capsys)

    assert main(["eval", "--list-tasks"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in T.list_tasks())
