"""Peer routing methods I end to end: each method (and CompeteSMoE + STGC) trains on the tiny recipe through
``stgc.train`` (2 steps, from scratch, on a generated mini suite), logs its diagnostics, saves what
evaluation needs, and is evaluated through lmms-eval (``stgc eval``). A MoCLE checkpoint evaluated twice
gives the same cluster ids and answers; bad settings are one line and exit 2 on the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stgc.cli import main
from stgc.recipes import apply_overrides, get_recipe

METHODS = {
    "competesmoe_stgc": ["method.competesmoe.warmup=0", "method.competesmoe.rate=1.0"],  # both layers compete
    "adamoe": [],
    "moma": [],
    "mocle": ["model.moe.router.num_clusters=4"],
}
DIAGNOSTICS = {
    "competesmoe_stgc": "competesmoe/competition_layers",
    "adamoe": "adamoe/true_experts_mean",
    "moma": "moma/cross_group",
    "mocle": "mocle/nmi",
}


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    from stgc.data.suite import generate_suite

    out = tmp_path_factory.mktemp("data") / "mini"
    generate_suite(
        out, docs=2, train_size=24, image_size=64, vocab_size=400, benchmarks=["gqa", "scienceqa_img"]
    )
    return out


@pytest.fixture(scope="module")
def trained(suite, tmp_path_factory) -> dict[str, Path]:
    from stgc.train import train

    runs = tmp_path_factory.mktemp("runs")
    out = {}
    for name, extra in METHODS.items():
        config = apply_overrides(
            get_recipe(f"tiny_{name}"),
            [
                f"data.train={suite / 'train'}",
                f"data.tokenizer={suite / 'tokenizer'}",
                "model.init=scratch",
                "training.max_steps=2",
                "training.batch_size=4",
                "training.save_steps=2",
                f"output_dir={runs / name}",
                *extra,
            ],
        )
        out[name] = train(config)
    return out


def _metrics(checkpoint: Path) -> list[dict]:
    return [json.loads(line) for line in (checkpoint.parent / "metrics.jsonl").read_text().splitlines()]


def test_each_method_trains_logs_its_diagnostics_and_saves_what_evaluation_needs(trained):
    for name, ckpt in trained.items():
        records = _metrics(ckpt)
        assert [r["step"] for r in records] == [1, 2], name
        assert all(DIAGNOSTICS[name] in r and np.isfinite(r["loss/total"]) for r in records), name
        config = json.loads((ckpt / "config.json").read_text())
        method = get_recipe(f"tiny_{name}").method.name
        assert config["routing_method"]["name"] == method
        assert config["moe"]["router"]["name"] == name.removesuffix("_stgc")
    comp = _metrics(trained["competesmoe_stgc"])
    assert all(
        r["competesmoe/competition_layers"] == 2 and "loss/distill" in r and "loss/cel" in r for r in comp
    )
    state = torch.load(trained["competesmoe_stgc"] / "objectives_state.pt", weights_only=True)
    assert state["competesmoe"]["schedule"].all()  # rate 1, no warm-up: every layer on every step
    assert all(r["moma/cross_group"] == 0 for r in _metrics(trained["moma"]))
    assert (trained["mocle"] / "instruction_clusters.json").is_file()


def test_mocle_checkpoint_evaluated_twice_gives_the_same_cluster_ids_and_answers(trained, suite, tmp_path):
    from datasets import load_from_disk

    from evals.lmms_model import StgcMoeLlava
    from stgc.clusters import InstructionClusters, first_instruction

    ckpt = trained["mocle"]
    answers = []
    for i in range(2):
        out = tmp_path / f"eval{i}"
        assert main(["eval", str(ckpt), "--tasks", "stgc_gqa", "--mini-root", str(suite), "--batch-size", "2",
                     "--max-new-tokens", "4", "--limit", "4", "--out", str(out)]) == 0  # fmt: skip
        rows = [json.loads(line) for line in (out / "samples_stgc_gqa.jsonl").read_text().splitlines()]
        answers.append([(r["doc_id"], r["resps"]) for r in rows])
    assert answers[0] == answers[1]

    # the cluster ids the adapter computes: the same in two fresh loads, and those training used
    train_rows = load_from_disk(str(suite / "train"))["train"]
    instructions = [first_instruction(c) for c in train_rows["conversations"]]
    adapters = [StgcMoeLlava(pretrained=str(ckpt)) for _ in range(2)]
    ids = [lm.clusters.predict(instructions) for lm in adapters]
    assert np.array_equal(ids[0], ids[1]) and len(set(ids[0].tolist())) > 1
    refit = InstructionClusters.fit(instructions, 4, seed=0)  # the training run's fit, repeated
    assert np.allclose(refit.centroids, InstructionClusters.load(ckpt).centroids, atol=1e-6)
    assert np.array_equal(refit.predict(instructions), ids[0])
    # the ids reach the model: another cluster changes the routing of the same prompt
    lm = adapters[1]
    with torch.no_grad():
        lm.model.model.language_model.layers[0].mlp.router.cluster_embedding.normal_()
    image = train_rows[0]["image"].convert("RGB")
    prompt = lm._prompt("What color is the square?", 1)
    inputs = lm._with_clusters(lm._inputs([prompt], [[image]]), ["What color is the square?"])
    logits = []
    for cluster in (0, 1):
        inputs["cluster_ids"] = torch.tensor([cluster])
        out = lm.model(**inputs, output_routing=True)
        logits.append(out.routing_records[0].logits_TE)
    assert not torch.equal(logits[0], logits[1])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "recipe, override, words",
    [
        ("tiny_adamoe", "model.moe.top_k=9", "top_k=9 is invalid for a router of width 8"),
        ("tiny_adamoe", "model.moe.top_k=1", "too small for AdaMoE"),
        ("tiny_moma", "model.moe.router.image_experts=3", "must add up to moe.num_experts=4"),
        ("tiny_moma_stgc", "model.moe.top_k=3", "larger than a MoMa group"),
        ("tiny_mocle", "model.moe.router.gate=per_sample", "gate='per_sample' is not valid"),
    ],
)
def test_bad_method_settings_on_the_command_line(recipe, override, words, capsys):
    assert main(["train", recipe, override, "--print-config"]) == 2
    assert words in _one_error_line(capsys)


def test_cluster_model_of_another_dimension_is_refused(trained, suite, tmp_path, capsys):
    bad = tmp_path / "checkpoint-2"
    shutil.copytree(trained["mocle"], bad)
    data = json.loads((bad / "instruction_clusters.json").read_text())
    data["centroids"] = [row[:8] for row in data["centroids"]]
    data["dim"] = 8
    (bad / "instruction_clusters.json").write_text(json.dumps(data))
    assert main(["eval", str(bad), "--tasks", "stgc_gqa", "--mini-root", str(suite), "--limit", "2"]) == 2
    line = _one_error_line(capsys)
    assert "dimension 384" in line and "have 8" in line
    (bad / "instruction_clusters.json").unlink()
    assert main(["eval", str(bad), "--tasks", "stgc_gqa", "--mini-root", str(suite), "--limit", "2"]) == 2
    assert "has no instruction_clusters.json" in _one_error_line(capsys)


def test_every_method_is_evaluated_through_lmms_eval_in_a_sweep(trained, suite, tmp_path):
    """Each trained checkpoint evaluated through lmms-eval (evals.run.evaluate, what `stgc eval` runs) by
    `stgc sweep`'s machinery: '+' labels are run folders, each label's RunConfig is its recipe (the
    checkpoints come from a stub trainer that copies the trained ones), scores and table are written."""
    import pandas as pd

    from evals import sweep as S

    runs = {
        "moma": "moma",
        "adamoe": "adamoe",
        "mocle+stgc": "mocle",
        "competesmoe+stgc": "competesmoe_stgc",
    }
    recipes = {"moma": "tiny_moma", "adamoe": "tiny_adamoe", "mocle+stgc": "tiny_mocle_stgc",
               "competesmoe+stgc": "tiny_competesmoe_stgc"}  # fmt: skip
    sweep = S.Sweep(
        name="peers_t",
        methods={label: get_recipe(recipe) for label, recipe in recipes.items()},
        seeds=(0,),
        tasks=("stgc_gqa",),
        eval=S.EvalSettings(batch_size=2, limit=2, mini_root=str(suite), gen_kwargs="max_new_tokens=4"),
        runs_root=str(tmp_path / "runs"),
        baseline="moma",
    )
    assert sweep.run_config("mocle+stgc", 0).method.name == "mocle+stgc"

    def stub_train(config) -> Path:
        label = Path(config.output_dir).name.rsplit("-seed", 1)[0]
        ckpt = Path(config.output_dir) / "checkpoint-2"
        shutil.copytree(trained[runs[label]], ckpt)
        return ckpt

    result = S.run_sweep(sweep, tmp_path / "results", train_fn=stub_train, progress=False)
    assert not result.failures
    scores = pd.read_csv(tmp_path / "results" / "scores.csv")
    assert set(scores["method"]) == set(recipes) and (scores["n"] == 2).all()
    assert (
        tmp_path / "runs" / "mocle+stgc-seed0" / "eval" / "checkpoint-2" / "stgc_gqa" / "results.json"
    ).is_file()
    assert set(pd.read_csv(tmp_path / "results" / "table.csv")["method"]) == set(recipes)
