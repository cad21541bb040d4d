"""The trainer (stgc.train) on a toy MoE language model: metrics, checkpoints, resume, failure modes.

The real tiny model and DeepSpeed have their own files (test_train_tiny.py, test_train_deepspeed.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from stgc.callbacks import StopAtStepCallback, aggregate_micro_batches
from stgc.recipes import RunConfig, TrainingConfig, stgc_variant
from stgc.train import (
    CheckpointError,
    NonFiniteLossError,
    RunComponents,
    check_checkpoint,
    read_metrics,
    train,
)
from tests.toy_moe import ToySequences, toy_model


def toy_components(num_layers: int = 2, dtype=torch.float32, hidden: int | None = None):
    def build(config: RunConfig) -> RunComponents:
        model = toy_model("swiglu", num_layers=num_layers, dtype=dtype, seed=config.training.seed)
        if hidden is not None:  # a model of another shape
            from tests.toy_moe import ToyMoEConfig, ToyMoEModel

            model = ToyMoEModel(ToyMoEConfig(hidden_size=hidden, num_layers=num_layers, moe=model.config.moe))
        return RunComponents(model, ToySequences(48), None)

    return build


def toy_config(tmp_path: Path, name: str = "run", **training) -> RunConfig:
    t = dict(
        lr=1e-2,
        max_steps=6,
        batch_size=4,
        grad_accum=2,
        save_steps=3,
        logging_steps=3,
        measure_conflict_every=2,
        trainable="all",
    )
    t.update(training)
    return RunConfig(name="toy", training=TrainingConfig(**t), output_dir=str(tmp_path / name))


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_metrics_checkpoints_and_idempotence(tmp_path):
    config = toy_config(tmp_path)
    final = train(config, components=toy_components())
    run = Path(config.output_dir)
    assert final == run / "checkpoint-6"
    assert {p.name for p in run.glob("checkpoint-*")} == {"checkpoint-3", "checkpoint-6"}
    saved = json.loads((run / "run_config.json").read_text())
    assert RunConfig.from_dict(saved) == config
    for ckpt in run.glob("checkpoint-*"):
        assert json.loads((ckpt / "run_config.json").read_text()) == saved
        assert (ckpt / "config.json").exists() and (ckpt / "optimizer.pt").exists()
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert r["method"] == "baseline"
        for key in ("loss/total", "loss/lm", "loss/aux", "loss/aux_scaled", "lr", "perf/step_time_s"):
            assert key in r, key
        for key in (
            "routing/layer0/imbalance",
            "routing/layer1/entropy",
            "routing/imbalance",
            "perf/peak_mem_mb",
        ):
            assert key in r, key
        assert r["perf/tokens"] == 2 * 4 * 8  # 2 micro-batches x 4 rows x 8 tokens
        assert not any("cel" in k for k in r)  # the baseline has no CEL: not logged as 0
        # the baseline measures conflicts every 2 steps (optimizer steps 0, 2, 4 -> records 1, 3, 5)
        assert ("conflict/fraction" in r) == (r["step"] % 2 == 1)
    assert records[2]["conflict/layer0/pairs"] == 2 * 4 * 8 * 2  # all tokens x top-2, both micro-batches

    # a finished run is returned as is, without training again
    mtime = (run / "metrics.jsonl").stat().st_mtime_ns
    assert train(config, components=lambda c: pytest.fail("must not build")) == final
    assert (run / "metrics.jsonl").stat().st_mtime_ns == mtime


def test_aggregate_micro_batches_pools_by_pairs_and_tokens():
    micro = [
        {"loss/lm": 1.0, "conflict/layer0/fraction": 0.5, "conflict/layer0/pairs": 10.0,
         "routing/layer0/tokens": 4.0, "routing/layer0/entropy": 1.0,
         "routing/layer0/tokens_e0": 4.0, "routing/layer0/tokens_e1": 4.0},
        {"loss/lm": 3.0, "conflict/layer0/fraction": 0.0, "conflict/layer0/pairs": 30.0,
         "routing/layer0/tokens": 12.0, "routing/layer0/entropy": 0.0,
         "routing/layer0/tokens_e0": 24.0, "routing/layer0/tokens_e1": 0.0},
    ]  # fmt: skip
    out = aggregate_micro_batches(micro)
    assert out["loss/lm"] == 2.0
    assert out["conflict/layer0/fraction"] == pytest.approx(5 / 40)
    assert out["conflict/layer0/pairs"] == 40.0 and out["conflict/fraction"] == pytest.approx(5 / 40)
    assert out["routing/layer0/entropy"] == pytest.approx(4 / 16)
    assert out["routing/layer0/imbalance"] == pytest.approx(28 / 16)
    assert out["routing/layer0/share_e0"] == pytest.approx(28 / 32)


@pytest.mark.parametrize("method", ["baseline", "stgc"])
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, method):
    def config(name):
        c = toy_config(tmp_path, name)
        return stgc_variant(c, beta=0.5) if method == "stgc" else c

    full = train(config("full"), components=toy_components())
    partial = train(config("cut"), components=toy_components(), callbacks=[StopAtStepCallback(3)])
    assert partial.name == "checkpoint-3" and not (partial.parent / "final.json").exists()
    resumed = train(config("cut"), components=toy_components())
    assert resumed.name == "checkpoint-6"
    a, b = final_weights(full), final_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics file holds each step once, and the resumed steps match the uninterrupted ones
    ra, rb = read_metrics(full.parent), read_metrics(resumed.parent)
    assert [r["step"] for r in rb] == [1, 2, 3, 4, 5, 6]
    assert [r["loss/total"] for r in ra] == [r["loss/total"] for r in rb]


def test_partial_run_needs_resume(tmp_path):
    config = toy_config(tmp_path)
    train(config, components=toy_components(), callbacks=[StopAtStepCallback(3)])
    with pytest.raises(CheckpointError, match="partial run"):
        train(config, components=toy_components(), resume=False)


class _Poison(TrainerCallback):
    """Makes the weights NaN after optimizer step ``step`` (the next forward's loss is NaN)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = toy_config(tmp_path, save_steps=2)
    with pytest.raises(NonFiniteLossError, match=r"step 4 .*checkpoint-2"):
        train(config, components=toy_components(), callbacks=[_Poison(3)])
    run = Path(config.output_dir)
    assert {p.name for p in run.glob("checkpoint-*")} == {"checkpoint-2"}
    assert not (run / "final.json").exists()
    assert all(torch.isfinite(t).all() for t in final_weights(run / "checkpoint-2").values())


class _PoisonGrad(TrainerCallback):
    """From optimizer step 2 on, the head's bias gradient is infinite while the loss stays finite."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            model.lm_head.bias.register_hook(lambda g: g * float("inf"))


def test_non_finite_gradient_is_never_applied(tmp_path):
    config = toy_config(tmp_path, save_steps=1)
    with pytest.raises(NonFiniteLossError, match="non-finite gradient at optimizer step 2"):
        train(config, components=toy_components(), callbacks=[_PoisonGrad()])
    run = Path(config.output_dir)
    assert {p.name for p in run.glob("checkpoint-*")} == {"checkpoint-1"}


def test_corrupt_checkpoint_is_an_error_not_a_restart(tmp_path):
    config = toy_config(tmp_path)
    train(config, components=toy_components(), callbacks=[StopAtStepCallback(3)])
    weights = Path(config.output_dir) / "checkpoint-3" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(config, components=toy_components())
    weights.write_bytes(data[:4])  # even the header is gone
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(config, components=toy_components())
    (weights.parent / "trainer_state.json").write_text("{")
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        train(config, components=toy_components())


def test_incompatible_run_folder_or_checkpoint_is_an_error(tmp_path):
    config = toy_config(tmp_path)
    train(config, components=toy_components(), callbacks=[StopAtStepCallback(3)])
    other = config.replace(model=config.model.replace(moe=config.model.moe.replace(num_experts=8)))
    with pytest.raises(CheckpointError, match=r"different settings .*model\.moe\.num_experts: 4 -> 8"):
        train(other, components=toy_components())
    with pytest.raises(CheckpointError, match="different settings .*training.lr"):
        train(config.replace(training=config.training.replace(lr=0.5)), components=toy_components())
    # a checkpoint whose tensors do not fit the model (another shape)
    wrong = toy_components(hidden=20)(config).model
    with pytest.raises(CheckpointError, match="does not fit this model"):
        check_checkpoint(Path(config.output_dir) / "checkpoint-3", config, wrong)
    # bookkeeping settings may change on resume
    ok = config.replace(training=config.training.replace(logging_steps=1, save_steps=2))
    assert train(ok, components=toy_components()).name == "checkpoint-6"


class _GradCapture(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_cel_gradient_is_scaled_for_gradient_accumulation(tmp_path):
    """With 2 micro-batches per step, fused and two_pass accumulate the same gradient (one MoE layer, so the
    masks are identical): the trainer gives the fused in-backward CEL gradient the loss's 1/GA factor."""
    grads = {}
    for mode in ("fused", "two_pass"):
        capture = _GradCapture()
        config = stgc_variant(toy_config(tmp_path, mode, max_steps=1, max_grad_norm=0.0), beta=0.5, mode=mode)
        train(config, components=toy_components(num_layers=1, dtype=torch.float64), callbacks=[capture])
        grads[mode] = capture.grads
    for name in grads["two_pass"]:
        torch.testing.assert_close(grads["fused"][name], grads["two_pass"][name], rtol=1e-5, atol=1e-7)
    metrics = read_metrics(tmp_path / "fused")[0]
    assert metrics["loss/cel_scaled"] == pytest.approx(0.5 * metrics["loss/cel"])


def test_trainable_groups_are_respected(tmp_path):
    config = toy_config(tmp_path, trainable="experts,router", max_steps=2, save_steps=2)
    start = toy_components()(config).model.state_dict()
    end = final_weights(train(config, components=toy_components()))
    for name, before in start.items():
        moved = not torch.equal(before, end[name])
        assert moved == (".experts." in name or ".router." in name), name
    with pytest.raises(ValueError, match="no \\['projector'\\] parameters"):
        train(toy_config(tmp_path, "p", trainable="projector"), components=toy_components())


def test_fp16_loss_scaling_is_refused_with_the_fused_mode():
    from types import SimpleNamespace

    from stgc.config import MoEConfig
    from stgc.trainer import check_loss_scaling
    from tests.toy_moe import objectives

    fused = objectives({"name": "stgc"}, MoEConfig())
    two_pass = objectives({"name": "stgc", "mode": "two_pass"}, MoEConfig())
    ds_fp16 = SimpleNamespace(fp16=False, deepspeed={"fp16": {"enabled": True}})
    with pytest.raises(ValueError, match="fp16 with loss scaling"):
        check_loss_scaling(ds_fp16, fused)
    check_loss_scaling(ds_fp16, two_pass)
    check_loss_scaling(SimpleNamespace(fp16=False, deepspeed={"fp16": {"enabled": "auto"}}), fused)
    check_loss_scaling(ds_fp16, objectives({"name": "baseline"}, MoEConfig()))
