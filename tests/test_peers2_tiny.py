"""The peer-II methods through the real pipeline on a small generated suite: ``train`` of the tiny recipes
(MoLE and AGM from a dense checkpoint, RoMA from a MoE one), checkpoints that load as one model with the
method saved, metrics.jsonl keys, objective state, then ``stgc eval`` through lmms-eval."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

import stgc.objectives.roma as roma_mod
from evals.run import load_results
from evals.testing import write_tiny_suite
from stgc.cli import main
from stgc.moe_adapters import ADAPTERS_NAME
from stgc.objectives.set import STATE_NAME
from stgc.recipes import apply_overrides, get_recipe
from stgc.train import read_metrics, train
from stgc.trainer import parameter_groups


def _tiny(recipe: str, suite: Path, out: Path, *overrides: str):
    return apply_overrides(
        get_recipe(recipe),
        [
            f"data.train={suite / 'train'}",
            f"data.tokenizer={suite / 'tokenizer'}",
            "training.max_steps=2",
            "training.batch_size=4",
            "training.save_steps=2",
            f"output_dir={out}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from stgc.data.suite import generate_suite

    tmp = tmp_path_factory.mktemp("peers2")
    suite = tmp / "mini"
    generate_suite(suite, docs=1, train_size=16, image_size=64, vocab_size=400, benchmarks=["scienceqa_img"])
    out = {"suite": suite, "eval_root": write_tiny_suite(tmp / "eval", n=2, names=["scienceqa_img"])}
    out["dense"] = train(_tiny("tiny_dense", suite, tmp / "dense", "model.vision_init=scratch"))
    out["mole"] = train(_tiny("tiny_mole", suite, tmp / "mole", f"model.init={out['dense']}"))
    out["agm"] = train(_tiny("tiny_agm", suite, tmp / "agm", f"model.init={out['dense']}"))
    out["tiny"] = train(_tiny("tiny", suite, tmp / "tiny", f"model.init={out['dense']}"))
    # a 2-step model answers no training question: RoMA's judge is told that every answer is right (the
    # judge itself: tests/test_roma.py); the rest of the stage is real (MiniLM embeddings, cache, steps)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(roma_mod, "answers_correctly", lambda model, rows, *a: np.ones(len(rows), dtype=bool))
        out["roma"] = train(_tiny("tiny_roma", suite, tmp / "roma", f"model.init={out['tiny']}"))
    return out


def test_mole_run(runs):
    final = runs["mole"]
    model = AutoModelForImageTextToText.from_pretrained(final)
    assert model.config.routing_method["name"] == "mole" and model.config.moe_config.experts.name == "lora"
    assert (final / ADAPTERS_NAME).exists() and not (final / "model.safetensors").exists()
    # only LoRA experts and routers moved: the frozen FFN is the dense parent's, as is everything else
    parent = AutoModelForImageTextToText.from_pretrained(runs["dense"]).state_dict()
    groups = parameter_groups(model)
    for name, tensor in model.state_dict().items():
        base = name.replace(".experts.", ".").replace(".base_layer.", ".")
        if groups.get(name) == "mlp" and ".experts." in name:
            assert torch.equal(tensor, parent[base]), name
    record = read_metrics(final.parent)[-1]
    assert record["loss/mole_bal_scaled"] == pytest.approx(0.01 * record["loss/mole_bal"])
    assert "routing/layer3/tokens_e2" in record or "routing/layer3/share_e2" in record


def test_agm_run(runs):
    final = runs["agm"]
    record = read_metrics(final.parent)[-1]
    for key in ("agm/kappa_I", "agm/kappa_T", "agm/s_I", "agm/s_T"):
        assert key in record and np.isfinite(record[key])
    state = torch.load(final / STATE_NAME, weights_only=True)
    assert state["agm"]["batches"] == 2


def test_roma_run_trains_routers_only(runs):
    final, init = runs["roma"], runs["tiny"]
    before = AutoModelForImageTextToText.from_pretrained(init).state_dict()
    model = AutoModelForImageTextToText.from_pretrained(final)
    groups = parameter_groups(model)
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed and {groups[n] for n in changed} == {"router"}
    record = read_metrics(final.parent)[-1]
    assert record["loss/roma"] > 0 and record["roma/correct_fraction"] == 1.0
    state = torch.load(final / STATE_NAME, weights_only=True)["roma"]
    assert state["neighbours"].shape[1] == 3 and state["cache_epoch"] == 0


@pytest.mark.parametrize("method", ["mole", "agm", "roma"])
def test_evaluates_through_lmms_eval(runs, method, capsys):
    root = str(runs["eval_root"])
    rc = main(["eval", str(runs[method]), "--tasks", "stgc_scienceqa_img", "--mini-root", root,
               "--batch-size", "2", "--max-new-tokens", "4", "--limit", "2"])  # fmt: skip
    assert rc == 0
    results = load_results(runs[method].parent / "eval" / runs[method].name)
    assert "stgc_scienceqa_img" in results["results"]


def test_a_sweep_trains_and_evaluates_each_method(runs, tmp_path, monkeypatch):
    """`stgc sweep`'s machinery with the real trainer and lmms-eval: labels such as `mole+stgc` are folder
    names, and RoMA's default init (`recipe:tiny`) trains its MoE parent inside the sweep's runs folder."""
    import pandas as pd

    from evals import sweep as S

    monkeypatch.setattr(roma_mod, "answers_correctly", lambda model, rows, *a: np.ones(len(rows), dtype=bool))
    suite = runs["suite"]

    def config(recipe: str):
        return _tiny(recipe, suite, tmp_path / "unused").replace(output_dir=None)

    methods = {"baseline": config("tiny"), "mole+stgc": config("tiny_mole_stgc")}
    methods |= {"agm": config("tiny_agm"), "roma": config("tiny_roma")}
    sweep = S.Sweep(
        name="peers2",
        methods=methods,
        seeds=(0,),
        tasks=("stgc_scienceqa_img",),
        eval=S.EvalSettings(batch_size=2, mini_root=str(runs["eval_root"]), limit=2),
        runs_root=str(tmp_path / "runs"),
    )
    result = S.run_sweep(sweep, tmp_path / "results", progress=False)
    assert not result.failures, result.failures
    scores = pd.read_csv(tmp_path / "results" / "scores.csv")
    assert set(scores["method"]) == set(methods)
    assert (tmp_path / "runs" / "tiny" / "final.json").is_file()  # RoMA's parent, trained in the sweep
    assert (tmp_path / "runs" / "mole+stgc-seed0" / "final.json").is_file()


def _error_lines(capsys) -> list[str]:
    """The error lines of stderr (progress bars of weight loading share its lines)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [seg[seg.index("stgc train: error:") :] for seg in re.split(r"[\r\n]+", err) if "error:" in seg]


def test_bad_input_through_the_cli_is_one_line_and_exit_2(runs, tmp_path, capsys, monkeypatch):
    """AGM on text-only data, and RoMA on a checkpoint that answers too few training samples, fail before
    the first step with one line on stderr (the errors raised inside the Trainer's epoch hook)."""
    from datasets import Dataset, DatasetDict, load_from_disk

    train = load_from_disk(str(runs["suite"] / "train"))["train"]
    strip = [[{**t, "value": t["value"].replace("<image>\n", "")} for t in c] for c in train["conversations"]]
    text = tmp_path / "text"
    DatasetDict({"train": Dataset.from_dict({"id": train["id"], "conversations": strip})}).save_to_disk(text)
    tok = runs["suite"] / "tokenizer"
    common = [f"data.tokenizer={tok}", "training.max_steps=1", "training.batch_size=4"]
    capsys.readouterr()
    agm = [f"data.train={text}", f"model.init={runs['dense']}", f"output_dir={tmp_path / 'a'}"]
    assert main(["train", "tiny_agm", *agm, *common]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and "text-only data" in err[0], err

    monkeypatch.setattr(roma_mod, "answers_correctly", lambda model, rows, *a: np.arange(len(rows)) < 1)
    train_dir = runs["suite"] / "train"
    roma = [f"data.train={train_dir}", f"model.init={runs['tiny']}", f"output_dir={tmp_path / 'r'}"]
    k = ["method.roma.k=5", "method.roma.judge_batch_size=8"]
    assert main(["train", "tiny_roma", *roma, *common, *k]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and "answers 2 of the 16 training samples correctly" in err[0], err
