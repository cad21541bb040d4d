"""The objective list's contracts (docs/extending.md): each built-in term equals its definition, a run's
objectives keep state across checkpoints, one observer per backward, dense steps, and bad names are one
clear line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from stgc.cli import main as stgc_main
from stgc.config import MoEConfig
from stgc.conflict import ConflictObserver
from stgc.moe import MoEBlock, RoutingContext, routing_context
from stgc.objectives.base import OBJECTIVES, Objective
from stgc.objectives.config import OBJECTIVE_CONFIGS, LoadBalanceConfig, MethodConfig, ObjectiveConfig
from stgc.objectives.load_balance import balance_loss
from stgc.objectives.set import STATE_NAME, ObjectiveSet
from stgc.objectives.z_loss import z_loss
from stgc.recipes import RunConfig, TrainingConfig
from stgc.train import CheckpointError, RunComponents, train
from tests.toy_moe import ToySequences, toy_batch, toy_model

D, F_ = 16, 24


def _record(cfg: MoEConfig, masked: bool = True):
    torch.manual_seed(0)
    block = MoEBlock(cfg, D, F_, "swiglu", layer_idx=0).train()
    x = torch.randn(2, 9, D)
    mask = torch.ones(2, 9, dtype=torch.bool)
    if masked:
        mask[1, 6:] = False
    ctx = RoutingContext(token_mask_BT=mask, records=[])
    with routing_context(block, ctx):
        block(x)
    return ctx.records[0], mask.reshape(-1)


def test_z_loss_is_the_mean_squared_logsumexp_of_real_tokens():
    record, mask = _record(MoEConfig())
    lse = torch.logsumexp(record.logits_TE.detach().double(), dim=-1)
    expected = float(lse[mask].square().mean())
    assert float(z_loss(record)) == pytest.approx(expected, rel=1e-6)
    assert record.token_mask_T.sum() < record.token_mask_T.numel()  # padding was there and left out


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(implementation="eager"),
        dict(capacity_factor=1.0, min_capacity=0),
        dict(route_padding=True),
        dict(top_k=1),
    ],
)
def test_every_routers_balance_loss_is_the_definition(settings):
    """The router's own L_aux (the fused kernel's, or the eager router's) equals the pure definition."""
    cfg = MoEConfig(**settings)
    record, _ = _record(cfg)
    expected = balance_loss(record, count_padding=cfg.route_padding)
    torch.testing.assert_close(record.aux_loss, expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- state


@dataclasses.dataclass(frozen=True)
class CounterConfig(ObjectiveConfig):
    name: str = "test_counter"


class Counter(Objective):
    """A stateful test objective: counts optimizer steps; its term is 0 (coefficient 0)."""

    name = "test_counter"

    def __init__(self, config, moe):
        super().__init__(config, moe)
        self.steps = 0
        self.loaded: dict | None = None

    def terms(self, records, step):
        return {"count": records[0].logits_TE.sum() * 0}

    def coefficients(self, step):
        return {"count": 0.0}

    def after_step(self, step):
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.loaded = dict(state)
        self.steps = state["steps"]


class Watcher(Counter):
    """A second objective that wants the token-gradient observer."""

    name = "test_watcher"

    def observer(self, step):
        return ConflictObserver()


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(OBJECTIVE_CONFIGS, "test_counter", CounterConfig)
    monkeypatch.setitem(OBJECTIVES, "test_counter", Counter)
    monkeypatch.setitem(OBJECTIVES, "test_watcher", Watcher)


def _toy_run(tmp_path: Path, max_steps: int) -> RunConfig:
    method = MethodConfig("counted", (LoadBalanceConfig(), CounterConfig()))
    training = TrainingConfig(
        lr=1e-2, max_steps=max_steps, batch_size=4, save_steps=2, logging_steps=2, trainable="all"
    )
    return RunConfig(name="toy", method=method, training=training, output_dir=str(tmp_path / "run"))


def _components(config: RunConfig) -> RunComponents:
    return RunComponents(toy_model("swiglu", dtype=torch.float32), ToySequences(32), None)


def test_objective_state_is_saved_with_every_checkpoint_and_restored(registered, tmp_path, monkeypatch):
    seen = []
    original = ObjectiveSet.load_state_dict
    monkeypatch.setattr(ObjectiveSet, "load_state_dict", lambda self, s: (seen.append(s), original(self, s)))
    config = _toy_run(tmp_path, max_steps=4)
    # stop after step 2 (an interrupted run), then resume to step 4
    from stgc.callbacks import StopAtStepCallback

    train(config, components=_components, callbacks=[StopAtStepCallback(2)])
    run = Path(config.output_dir)
    assert torch.load(run / "checkpoint-2" / STATE_NAME) == {"test_counter": {"steps": 2}}
    final = train(config, components=_components)
    assert seen == [{"test_counter": {"steps": 2}}]  # restored from checkpoint-2
    assert torch.load(final / STATE_NAME) == {"test_counter": {"steps": 4}}


def test_resume_refuses_a_checkpoint_without_the_objectives_state(registered, tmp_path):
    from stgc.callbacks import StopAtStepCallback

    config = _toy_run(tmp_path, max_steps=4)
    train(config, components=_components, callbacks=[StopAtStepCallback(2)])
    (Path(config.output_dir) / "checkpoint-2" / STATE_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"has no {STATE_NAME}"):
        train(config, components=_components)


def test_two_objectives_with_observers_are_refused(registered):
    configs = [LoadBalanceConfig(), CounterConfig(name="test_counter")]
    ObjectiveSet(configs, MoEConfig())  # one without an observer: fine
    stgc = OBJECTIVE_CONFIGS["stgc"]()
    watcher = dataclasses.replace(CounterConfig(), name="test_watcher")
    with pytest.raises(ValueError, match=r"\['stgc', 'test_watcher'\] each need the token-gradient observer"):
        ObjectiveSet([LoadBalanceConfig(), stgc, watcher], MoEConfig())


# ------------------------------------------------------------------------------------------ dense steps


@pytest.mark.parametrize("ffn", ["swiglu", "gelu"])
def test_a_dense_step_of_the_default_router_equals_the_sparse_step(ffn):
    """Every expert runs on every token (a competition step's seam); the default router then chooses as on
    any step, so outputs, gradients and the observer's conflict masks equal the sparse step's."""
    model = toy_model(ffn, num_layers=2)
    batch = toy_batch(pad=2)

    def run(dense: frozenset[int] | None):
        model.zero_grad(set_to_none=True)
        obs = ConflictObserver(scale=0.3)
        ctx = RoutingContext(records=[], observer=obs, dense_layers=dense)
        out = model(**batch, routing_ctx=ctx)
        (out.loss + 0.01 * sum(r.aux_loss for r in ctx.records)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        masks = {k: (v.token_A, v.expert_A, v.conflict_A, v.considered_A) for k, v in obs.layers.items()}
        return out.loss.detach(), grads, masks

    sparse, dense = run(None), run(frozenset({0, 1}))
    torch.testing.assert_close(dense[0], sparse[0], rtol=1e-10, atol=1e-12)
    for name in sparse[1]:
        torch.testing.assert_close(dense[1][name], sparse[1][name], rtol=1e-9, atol=1e-11, msg=name)
    for layer, (tok, exp, conf, cons) in sparse[2].items():
        d = dense[2][layer]
        pick = {(t, e): (c, k) for t, e, c, k in zip(*(x.tolist() for x in d), strict=True) if k}
        want = {
            (t, e): (c, k)
            for t, e, c, k in zip(tok.tolist(), exp.tolist(), conf.tolist(), cons.tolist())
            if k
        }
        assert pick == want and any(c for c, _ in want.values())


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.moe.router.name=nope", "moe.router.name='nope' is unknown; valid choices are"),
        ("model.moe.experts.name=nope", "moe.experts.name='nope' is unknown; valid choices are"),
        ("method.objectives=load_balance,nope", "unknown objectives ['nope']; valid objectives are"),
        ("method.objectives=load_balance,stgc,stgc", "lists ['stgc'] more than once"),
    ],
)
def test_bad_part_names_are_one_line_and_exit_2(override, message, capsys):
    assert stgc_main(["train", "tiny", override, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
