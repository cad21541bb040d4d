"""Recipes, run configs, key=value overrides and the ``stgc train`` command line (no training here)."""

from __future__ import annotations

import json

import pytest

from stgc.cli import main as stgc_main
from stgc.config import MoEConfig
from stgc.objectives.config import LoadBalanceConfig, MethodConfig, STGCConfig, ZLossConfig
from stgc.recipes import (
    RECIPES,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainingConfig,
    apply_overrides,
    get_recipe,
    stgc_variant,
    with_seed,
)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_is_valid_and_round_trips(name):
    config = get_recipe(name)
    assert isinstance(config, RunConfig)
    again = RunConfig.from_dict(json.loads(config.to_json()))
    assert again == config
    assert str(config.run_dir).startswith("runs/")
    if name.endswith("_stgc"):
        base = get_recipe(name.removesuffix("_stgc"))
        # STGC on top of the base recipe's method: its objectives plus stgc, nothing else changed
        assert config.method.objectives == (*base.method.objectives, STGCConfig())
        assert config.method.name == (
            "stgc" if base.method.name == "baseline" else f"{base.method.name}+stgc"
        )
        assert config.replace(method=base.method) == base


def test_moe_llava_recipes_use_the_published_stage3_settings():
    for name in ("moe_llava_stablelm_1_6b", "moe_llava_qwen_1_8b", "moe_llava_phi2_2_7b"):
        c = get_recipe(name)
        t = c.training
        assert (t.lr, t.lr_scheduler, t.warmup_ratio, t.weight_decay, t.epochs) == (
            2e-5,
            "cosine",
            0.03,
            0.0,
            1.0,
        )
        assert (
            t.batch_size * t.grad_accum * 8 == 128
            and t.bf16
            and t.deepspeed == "configs/deepspeed_zero2.json"
        )
        assert c.model.size == "full" and c.model.moe.num_experts == 4 and c.model.moe.top_k == 2
        assert c.model.moe.aux_loss_coef == 0.01 and c.data.max_length == 2048
        # DeepSpeed's capacity factors in MoE-LLaVA's scripts: 1.5 in training, 2.0 at evaluation
        assert c.model.moe.capacity(training=True) == 1.5 and c.model.moe.capacity(training=False) == 2.0
        assert t.trainable_groups() == ("experts", "router", "projector")


def test_variants_derive_in_code():
    base = get_recipe("tiny")
    v = with_seed(stgc_variant(base, beta=0.05, mode="two_pass"), 3)
    assert v.method.objective("stgc") == STGCConfig(beta=0.05, mode="two_pass") and v.training.seed == 3
    assert v.model == base.model and v.data == base.data
    assert str(v.run_dir) == "runs/tiny-stgc-beta0.05-modetwo_pass-seed3"
    with pytest.raises(ValueError, match="beta"):
        stgc_variant(base, beta=-1.0)


def test_overrides_convert_types_and_switch_methods():
    c = apply_overrides(
        get_recipe("tiny"),
        [
            "training.lr=1e-4",
            "method.name=stgc",
            "method.beta=0.05",
            "method.layers=0,2",
            "model.moe.top_k=1",
            "model.moe.capacity_factor=1.5",
            "training.bf16=true",
            "training.save_total_limit=none",
            "training.trainable=experts,router",
            "output_dir=runs/x",
        ],
    )
    assert c.training.lr == 1e-4 and isinstance(c.training.lr, float)
    assert c.method == MethodConfig("stgc", (LoadBalanceConfig(), STGCConfig(beta=0.05, layers=(0, 2))))
    assert c.model.moe == MoEConfig(top_k=1, capacity_factor=1.5)
    assert c.training.bf16 is True and c.training.save_total_limit is None
    assert c.training.trainable == "experts,router" and str(c.run_dir) == "runs/x"
    back = apply_overrides(c, ["method.name=baseline"])
    assert back.method == MethodConfig() and back.method.objective("stgc") is None
    # the objective list, its settings, and the layout saved before objectives existed
    z = apply_overrides(
        get_recipe("tiny"), ["method.objectives=load_balance,z_loss", "method.z_loss.coef=0.1"]
    )
    assert z.method == MethodConfig("z_loss", (LoadBalanceConfig(), ZLossConfig(coef=0.1)))
    assert str(z.run_dir) == "runs/tiny-z_loss-coef0.1-seed0"
    legacy = RunConfig.from_dict({**get_recipe("tiny").to_dict(), "method": {"name": "stgc", "beta": 0.05}})
    assert legacy.method == MethodConfig("stgc", (LoadBalanceConfig(), STGCConfig(beta=0.05)))
    both = apply_overrides(get_recipe("tiny_stgc"), ["method.objectives=load_balance,z_loss,stgc"])
    assert both.method.name == "z_loss+stgc" and both.method.objective("stgc") == STGCConfig()
    # the router, the bank and the capacity factors of the MoE layers
    r = apply_overrides(
        get_recipe("tiny"),
        ["model.moe.router.bias=true", "model.moe.capacity_factor=1.5", "model.moe.eval_capacity_factor=2"],
    )
    assert (
        r.model.moe.router.bias and r.model.moe.capacity(True) == 1.5 and r.model.moe.capacity(False) == 2.0
    )


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["training.lrr=1"], r"unknown config key 'training.lrr'; valid keys here are \[.*'training.lr'"),
        (["nope=1"], r"valid keys here are \[.*'training'"),
        (["method.beta=0.1"], r"the method 'baseline' has the objectives \['load_balance'\]"),
        (["method.name=nope"], r"unknown; valid methods are \[.*'baseline'.*'stgc'"),
        (["method.objectives=load_balance,nope"], r"unknown objectives \['nope'\]; valid objectives are"),
        (["method.stgc.beta=0.1"], "the method has no objective 'stgc'"),
        (["model.moe.router.name=nope"], r"moe.router.name='nope' is unknown; valid choices are"),
        (["model.moe.experts.name=nope"], r"moe.experts.name='nope' is unknown; valid choices are"),
        (["model.moe.router.nope=1"], "unknown config key 'model.moe.router.nope'"),
        (["model.moe.eval_capacity_factor=2"], "without a training capacity_factor"),
        (["model.moe.implementation=fast"], "moe.implementation='fast' is not valid"),
        (["training.lr=fast"], "training.lr='fast' is not a number"),
        (["training.bf16=maybe"], "not a boolean"),
        (["model.moe=3"], "is a section"),
        (["training.lr"], "not key=value"),
        (["training.lr=-1"], "training.lr=-1.0 must be > 0"),
        (["training.trainable=experts,heads"], r"unknown group\(s\) \['heads'\]"),
        (["model.size=huge"], "valid sizes are"),
        (["model.backbone=gpt"], "valid backbones are"),
        (["method.name=stgc", "method.tau=2"], r"tau=2.0 is outside \[-1, 1\]"),
        (["model.init=recipe:nope"], "unknown recipe"),
    ],
)
def test_bad_overrides_are_clear_value_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(get_recipe("tiny"), overrides)


def test_unknown_recipe_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown recipe 'tiny2'; valid recipes are \[.*'tiny'"):
        get_recipe("tiny2")


def test_section_validation():
    with pytest.raises(ValueError, match="max_length"):
        DataConfig(max_length=2)
    with pytest.raises(ValueError, match="epochs"):
        TrainingConfig(epochs=0, max_steps=-1)
    with pytest.raises(ValueError, match="names MoE parameters"):
        RunConfig(model=ModelConfig(dense=True), training=TrainingConfig(trainable="experts"))
    with pytest.raises(ValueError, match="unknown key"):
        RunConfig.from_dict({"model": {"backbon": "llama"}})


def test_cli_bad_input_is_one_line_and_nonzero(capsys, tmp_path):
    assert stgc_main(["train", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("stgc train: error: unknown recipe 'nope'")
    assert stgc_main(["train", "tiny", "training.lrr=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    # (the run folder is not under the data path: locking it creates it while the run checks its inputs)
    run = tmp_path / "runs" / "x"
    assert stgc_main(["train", "tiny", "--output-dir", str(run), "data.train=/nonexistent"]) == 2
    assert "data.train='/nonexistent' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # a refused run leaves no folder behind


def test_cli_refuses_a_suite_of_another_generator_version_before_training(capsys, tmp_path):
    from stgc.data.suite import GENERATOR_VERSION, MARKER

    suite = tmp_path / "mini"
    (suite / "train").mkdir(parents=True)
    (suite / "tokenizer").mkdir()
    (suite / MARKER).write_text(json.dumps({"generator_version": GENERATOR_VERSION - 1, "benchmarks": {}}))
    run = tmp_path / "runs" / "x"
    argv = ["train", "tiny_dense", "--output-dir", str(run), f"data.train={suite / 'train'}"]
    assert stgc_main([*argv, f"data.tokenizer={suite / 'tokenizer'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "generator version" in err and "--overwrite" in err
    assert not (tmp_path / "runs").exists()


def test_cli_prints_the_resolved_config(capsys):
    assert stgc_main(["train", "tiny_stgc", "method.beta=0.05", "--print-config"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"]["objectives"][1] == {**STGCConfig(beta=0.05).to_dict(), "layers": None}
    assert data["output_dir"] == "runs/tiny-stgc-beta0.05-seed0"
    assert stgc_main(["train", "--list"]) == 0
    assert "tiny_stgc" in capsys.readouterr().out
