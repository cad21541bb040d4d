"""The MoE block against its references (docs/architecture.md, Conventions): the dense FFN (1 expert, top-1)
and DeepSpeed's MoE layer, MoE-LLaVA's implementation, under matching settings;
plus evaluation determinism and config errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, PhiConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.phi.modeling_phi import PhiMLP

from stgc.config import MoEConfig
from stgc.moe import MoEBlock, RoutingContext, routing_context

D, F_ = 16, 32


def _dense_mlp(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        return LlamaMLP(
            LlamaConfig(hidden_size=D, intermediate_size=F_, num_attention_heads=4, hidden_act="silu")
        )
    mlp = PhiMLP(PhiConfig(hidden_size=D, intermediate_size=F_, num_attention_heads=4, hidden_act="gelu_new"))
    return mlp


def _from_dense(mlp: torch.nn.Module, cfg: MoEConfig) -> MoEBlock:
    return MoEBlock.upcycled(cfg, mlp, "swiglu" if hasattr(mlp, "gate_proj") else "gelu", 0)


@pytest.mark.parametrize("implementation", ["auto", "eager"])
@pytest.mark.parametrize("kind", ["llama", "phi"])
def test_one_expert_equals_dense_ffn(kind, implementation):
    """E=1, K=1: the block is the dense FFN, in outputs and in gradients w.r.t. inputs and weights, on the
    fused path and on the eager parts."""
    mlp = _dense_mlp(kind)
    block = _from_dense(mlp, MoEConfig(num_experts=1, top_k=1, implementation=implementation)).train()
    assert block.implementation == ("fused" if implementation == "auto" else "eager")
    x = torch.randn(3, 7, D)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(3, 7, D)
    y_dense, y_moe = mlp(x1), block(x2)
    torch.testing.assert_close(y_moe, y_dense, rtol=0, atol=1e-6)
    (y_dense * g).sum().backward()
    (y_moe * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-6)
    bank = block.experts
    if kind == "llama":
        w_in = torch.cat([mlp.gate_proj.weight.grad, mlp.up_proj.weight.grad])
        pairs = [(bank.w_in.grad[0], w_in), (bank.w_out.grad[0], mlp.down_proj.weight.grad)]
    else:
        pairs = [
            (bank.w_in.grad[0], mlp.fc1.weight.grad),
            (bank.b_in.grad[0], mlp.fc1.bias.grad),
            (bank.w_out.grad[0], mlp.fc2.weight.grad),
            (bank.b_out.grad[0], mlp.fc2.bias.grad),
        ]
    for ours, ref in pairs:
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_upcycled_block_equals_dense_ffn():
    """E=4, K=2 with every expert a copy: the output is the dense FFN's (combine weights sum to 1)."""
    mlp = _dense_mlp("llama")
    block = _from_dense(mlp, MoEConfig()).eval()
    with torch.no_grad():
        block.router.weight.normal_()
        x = torch.randn(2, 9, D)
        torch.testing.assert_close(block(x), mlp(x), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# DeepSpeed's MoE layer (deepspeed.moe.layer.MoE) holding the same weights

DS_CASES = {
    # name: (our MoEConfig kwargs, DeepSpeed kwargs)
    "no_drop": (dict(), dict(drop_tokens=False)),
    "capacity_drop": (
        dict(capacity_factor=0.75, min_capacity=0),
        dict(capacity_factor=0.75, drop_tokens=True),
    ),
    "min_capacity": (
        dict(capacity_factor=0.25, min_capacity=12),
        dict(capacity_factor=0.25, min_capacity=12, drop_tokens=True),
    ),
    # a shared seed: the Gumbel draws of both implementations are the same numbers
    "sampled_2nd_expert": (
        dict(second_expert_sampling=True),
        dict(drop_tokens=False, top2_2nd_expert_sampling=True),
    ),
    "moellava": (
        dict(capacity_factor=1.5, min_capacity=0, second_expert_sampling=True),
        dict(capacity_factor=1.5, min_capacity=0, drop_tokens=True, top2_2nd_expert_sampling=True),
    ),
}


@pytest.fixture(scope="module")
def process_group():
    from stgc.bench.deepspeed_ref import single_process_group

    with single_process_group("gloo"):
        yield


@pytest.mark.parametrize("ffn", ["swiglu", "gelu"])
@pytest.mark.parametrize("case", list(DS_CASES))
def test_block_equals_deepspeed_moe(process_group, ffn, case):
    """Outputs, aux loss, kept-token counts and every gradient equal DeepSpeed's (fp32, training mode)."""
    from stgc.bench.deepspeed_ref import deepspeed_moe_from_block, expert_grads_as_bank

    ours_kw, ds_kw = DS_CASES[case]
    torch.manual_seed(0)
    block = MoEBlock(MoEConfig(**ours_kw), D, F_, ffn, layer_idx=0).train()
    with torch.no_grad():
        block.router.weight.normal_()  # peaked routing, so that capacity limits bite
        if ffn == "gelu":
            block.experts.b_in.normal_()
            block.experts.b_out.normal_()
    ds = deepspeed_moe_from_block(block, **ds_kw).train()
    x = torch.randn(3, 20, D)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)

    ctx = RoutingContext(records=[])
    torch.manual_seed(1234)
    with routing_context(block, ctx):
        y_ours = block(x1)
    torch.manual_seed(1234)
    y_ds, aux_ds, counts_ds = ds(x2)
    rec = ctx.records[0]

    torch.testing.assert_close(y_ours, y_ds, rtol=0, atol=1e-6)
    torch.testing.assert_close(rec.aux_loss, aux_ds, rtol=0, atol=1e-6)
    if not ds_kw.get("drop_tokens", True):  # DeepSpeed counts assignments before dropping
        assert rec.tokens_per_expert_E.tolist() == counts_ds.tolist()
    ((y_ours * g).sum() + rec.aux_loss).backward()
    ((y_ds * g).sum() + aux_ds).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        block.router.weight.grad, ds.deepspeed_moe.gate.wg.weight.grad, rtol=0, atol=1e-5
    )
    for name, ref in expert_grads_as_bank(ds, ffn).items():
        torch.testing.assert_close(getattr(block.experts, name).grad, ref, rtol=0, atol=1e-5)
    if ds_kw.get("drop_tokens") and case != "moellava":
        assert not rec.kept_TK.all(), "the capacity case should drop some assignments"


# --------------------------------------------------------------------------------------------------------
# evaluation: deterministic, stateless


def _snapshot(block: MoEBlock):
    return (
        {k: v.clone() for k, v in block.state_dict().items()},
        sorted(block.__dict__),
        {k: v for k, v in block.__dict__.items() if not k.startswith("_") and k != "routing_ctx"},
    )


@pytest.mark.parametrize("sampling", [False, True])
def test_eval_routing_is_deterministic_and_stateless(sampling):
    """Two eval forwards give identical outputs and records (also with 2nd-expert sampling configured for
    training only), and a forward changes no parameter, buffer or attribute of the block."""
    torch.manual_seed(0)
    block = MoEBlock(MoEConfig(second_expert_sampling=sampling), D, F_, "swiglu", 0).eval()
    x = torch.randn(4, 5, D)
    before = _snapshot(block)
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)  # a different RNG state must not matter at evaluation
        ctx = RoutingContext(records=[])
        with torch.no_grad(), routing_context(block, ctx):
            outs.append((block(x), ctx.records[0]))
    (y1, r1), (y2, r2) = outs
    assert torch.equal(y1, y2)
    assert torch.equal(r1.topk_idx_TK, r2.topk_idx_TK) and torch.equal(r1.weights_TK, r2.weights_TK)
    # without sampling the 2nd expert is the 2nd most probable one
    assert torch.equal(r1.topk_idx_TK, r1.probs_TE.topk(2, dim=-1).indices)
    after = _snapshot(block)
    assert before[1] == after[1] and before[2] == after[2]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert block.routing_ctx is None


def test_training_sampling_differs_from_eval():
    """Sanity check of the switch: with sampling in training, the 2nd expert is not always the argmax."""
    torch.manual_seed(0)
    block = MoEBlock(MoEConfig(second_expert_sampling=True), D, F_, "swiglu", 0).train()
    ctx = RoutingContext(records=[])
    with torch.no_grad(), routing_context(block, ctx):
        block(torch.randn(64, D))
    rec = ctx.records[0]
    assert not torch.equal(rec.topk_idx_TK, rec.probs_TE.topk(2, dim=-1).indices)


# --------------------------------------------------------------------------------------------------------
# config errors name the value and the valid range


def test_bad_moe_config_raises():
    with pytest.raises(ValueError, match=r"top_k=5.*1 <= top_k <= 4"):
        MoEConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match=r"\[7\].*0\.\.3"):
        MoEConfig(layers=(0, 7)).resolve_layers(4)
