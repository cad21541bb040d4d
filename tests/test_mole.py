"""LLaVA-MoLE (stgc.moe.experts.lora, stgc.moe.routers.mole, stgc.objectives.mole_balance): the model at
step 0 is its dense parent, only LoRA deltas and routers learn, the mixture is the formula, the balance loss
is its definition, STGC's token gradients are the virtual biases' gradients, checkpoints keep the experts
apart, bad ranks are one clear error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText

from stgc.cli import main
from stgc.config import LoRAExpertsConfig, MoEConfig
from stgc.modeling import MoELlavaForConditionalGeneration
from stgc.moe import MoEBlock, RoutingContext, routing_context
from stgc.moe.experts.lora import LoRAExperts, adapter_name
from stgc.moe_adapters import ADAPTERS_NAME, BASE_NAME
from stgc.objectives.config import MethodConfig, MoLEBalanceConfig, STGCConfig
from stgc.objectives.mole_balance import mole_balance
from stgc.objectives.set import ObjectiveSet
from stgc.recipes import get_recipe
from stgc.trainer import parameter_groups, set_trainable
from tests.conftest import image_batch, tiny_dense_llava
from tests.toy_moe import objectives, toy_batch, toy_model

RECIPE = get_recipe("tiny_mole")
MOLE = RECIPE.model.moe


def _mole(backbone: str = "llama", moe: MoEConfig = MOLE):
    dense = tiny_dense_llava(backbone)
    return dense, MoELlavaForConditionalGeneration.from_dense(dense, moe, RECIPE.method.to_dict())


def _labelled(model, seed: int = 0):
    batch = image_batch(model, batch=3, text_len=8, seed=seed, pad_right=2)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, : labels.shape[1] - 6] = -100  # the answer: the last real words
    return {**batch, "labels": labels}


def _random_deltas(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)


@pytest.mark.parametrize("backbone, mode", [("llama", "eval"), ("llama", "train"), ("phi", "train")])
def test_step0_equals_dense_parent(backbone, mode):
    """peft's LoRA init (B = 0) makes every delta 0: the MoLE model computes its dense parent. Exactly for
    SwiGLU backbones; Phi-2's GELU experts compute torch's tanh-GELU where the parent's gelu_new writes the
    same function as a formula, so there the last bits may differ (as for the FFN bank)."""
    dense, mole = _mole(backbone)
    dense.train(mode == "train"), mole.train(mode == "train")  # train: LoRA dropout is on
    with torch.no_grad():
        for block in mole.moe_blocks.values():  # a peaked router: routing must not matter at step 0
            block.router.weight.normal_()
        batch = image_batch(dense, pad_right=2)
        got, want = mole(**batch).logits, dense(**batch).logits
    if backbone == "phi":
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    else:
        assert torch.equal(got, want)
    assert mole.config.moe_layers == tuple(range(dense.config.text_config.num_hidden_layers))
    # the dense FFN is stored once per layer (no E copies), E LoRA adapters beside it
    bank = mole.moe_blocks[0].experts
    bases = [n for n, _ in bank.named_parameters() if bank.parameter_group(n) == "mlp"]
    assert len(bases) == (4 if backbone == "phi" else 3)
    assert sorted(bank.down_proj.lora_A if backbone != "phi" else bank.fc2.lora_A) == [
        adapter_name(e) for e in range(3)
    ]


def test_only_lora_and_routers_receive_gradients():
    torch.manual_seed(0)  # the routing of the random model (which experts get a token) is the seed's
    _, model = _mole()
    model.train()
    groups = set_trainable(model, RECIPE.training.trainable, RECIPE.training.trainable_groups())
    assert set(groups) == {"experts", "router"}
    by_name = parameter_groups(model)
    method = ObjectiveSet(RECIPE.method, MOLE)
    batch = _labelled(model)
    for step in range(2):
        model.zero_grad(set_to_none=True)
        method.step_loss(model, batch, step).loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        expected = {n for n, g in by_name.items() if g in ("experts", "router")}
        # every router learns; an expert's LoRA only when top-1 routing sent it a token in this batch
        routers = {n for n in expected if ".router." in n}
        assert routers <= with_grad <= expected and all("lora_" in n or ".router." in n for n in expected)
        grads = dict(model.named_parameters())
        assert any(
            grads[n].grad is not None and grads[n].grad.abs().sum() > 0 for n in expected if "lora_B" in n
        )
        assert any(grads[n].grad.abs().sum() > 0 for n in expected if ".router." in n)
        if step == 0:
            _random_deltas(model)  # step 1: deltas are no longer 0, the LM loss reaches A and the router
    # (an expert that no token chose in this batch has no gradient at all)
    assert any(grads[n].grad is not None and grads[n].grad.abs().sum() > 0 for n in expected if "lora_A" in n)


@pytest.mark.parametrize("top_k", [1, 3])
def test_mixture_is_the_formula(top_k):
    """Each projection P_t(v) = P(v) + sum_k p_tk * s * B_e A_e v: the chosen delta scaled by its
    probability (top-1), or the released dense soft mixture (top_k = E). The router's weights are p, not
    renormalised, so the LM loss reaches the router."""
    torch.manual_seed(0)
    moe = MoEConfig(
        num_experts=3, top_k=top_k, layer_every=1, router={"name": "mole"},
        experts={"name": "lora", "rank": 4, "dropout": 0.0},
    )  # fmt: skip
    block = MoEBlock(moe, 16, 24, "swiglu", layer_idx=0).double()
    block.router.double()
    _random_deltas(block)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    ctx = RoutingContext(records=[])
    with routing_context(block, ctx):
        y = block(x)
    (record,) = ctx.records
    p_TE = record.probs_TE
    w_TE = torch.zeros_like(p_TE).scatter(1, record.topk_idx_TK, record.weights_TK)
    chosen = p_TE.gather(1, record.topk_idx_TK)
    torch.testing.assert_close(record.weights_TK, chosen)  # not renormalised
    bank, x_TD = block.experts, x.reshape(-1, 16)

    def mixed(layer, v):
        out = F.linear(v, layer.base_layer.weight)
        for e in range(3):
            n = adapter_name(e)
            delta = v @ layer.lora_A[n].weight.T @ layer.lora_B[n].weight.T * layer.scaling[n]
            out = out + w_TE[:, e : e + 1] * delta
        return out

    a = F.silu(mixed(bank.gate_proj, x_TD)) * mixed(bank.up_proj, x_TD)
    torch.testing.assert_close(y.reshape(-1, 16), mixed(bank.down_proj, a), rtol=1e-12, atol=1e-12)
    (gw,) = torch.autograd.grad(y.square().sum(), block.router.weight)
    assert gw.abs().sum() > 0


def test_balance_loss_is_its_definition():
    """sum_e mean(p_e) * mean(1[argmax = e]), pooled per sample over every layer and real token, averaged
    over samples; padding excluded."""
    _, model = _mole()
    batch = _labelled(model)
    ctx = RoutingContext(records=[])
    model.eval()(**batch, routing_ctx=ctx)
    B, S = batch["input_ids"].shape
    want = []
    for b in range(B):
        real = batch["attention_mask"][b].bool()
        p = torch.cat([r.probs_TE.reshape(B, S, -1)[b][real] for r in ctx.records])
        top1 = torch.cat([r.topk_idx_TK[:, 0].reshape(B, S)[b][real] for r in ctx.records])
        f = torch.stack([(top1 == e).float().mean() for e in range(3)])
        want.append((p.mean(0) * f).sum())
    got = mole_balance(ctx.records, B)
    torch.testing.assert_close(got, torch.stack(want).mean())
    # the objective: a forward term (the batch size comes with the records), with its coefficient
    assert {r.batch_size for r in ctx.records} == {B}
    method = ObjectiveSet(RECIPE.method, MOLE)
    assert method.items[0].terms(ctx.records, 0)["mole_bal"] == got
    assert method.items[0].coefficients(0) == {"mole_bal": 0.01}
    terms, coefs = method.forward_terms(ctx.records, 0)  # in the main loss two_pass's first pass uses
    assert terms["mole_bal"] == got and coefs["mole_bal"] == 0.01


def test_stgc_token_gradients_are_the_virtual_bias_gradients():
    """STGC on MoLE: the token gradients the bank hands its observer (g2 at the delta's output before its
    weight, g1 at the down projection's input) are the gradients of per-token zero biases placed there
    (the `reference` mode, torch.func): same scores, same conflict masks."""
    moe = dict(
        num_experts=3, top_k=1, router={"name": "mole"}, experts={"name": "lora", "rank": 4, "dropout": 0.0}
    )
    model = toy_model("swiglu", num_layers=2, **moe)
    _random_deltas(model)
    batch = toy_batch(batch=3, seq=8, pad=1)
    moe_cfg = MoEConfig(**moe)
    results = {}
    for mode in ("two_pass", "reference"):
        method = objectives(STGCConfig(beta=0.1, mode=mode), moe_cfg)
        model.zero_grad(set_to_none=True)
        result = method.step_loss(model, batch, 0)
        result.loss.backward()
        results[mode] = result.observer.layers

    def pairs(lc):  # {(token, expert): (conflict, score)} over the pairs scored
        rows = lc.considered_A.nonzero().flatten().tolist()
        return {
            (int(lc.token_A[i]), int(lc.expert_A[i])): (bool(lc.conflict_A[i]), float(lc.score_A[i].detach()))
            for i in rows
        }

    n_conflicts = 0
    for layer, want_lc in results["reference"].items():
        got, want = pairs(results["two_pass"][layer]), pairs(want_lc)
        assert got.keys() == want.keys() and got
        for key, (conflict, score) in want.items():
            assert got[key][0] == conflict and got[key][1] == pytest.approx(score, abs=1e-9), key
            n_conflicts += conflict
    assert n_conflicts > 0


def test_stgc_two_pass_token_gradients_include_the_balance_term():
    """mole_balance is a forward term, so two_pass's first backward (the one that finds the masks)
    differentiates it, as the fused mode's single backward does: with a strong balance term and a negligible
    beta the two modes score alike, and the term does reach the scores (the first MoE layer's outputs feed
    the second layer's router)."""
    moe = dict(
        num_experts=3, top_k=1, router={"name": "mole"}, experts={"name": "lora", "rank": 4, "dropout": 0.0}
    )
    model = toy_model("swiglu", num_layers=2, **moe)
    _random_deltas(model)
    batch = toy_batch(batch=3, seq=8, pad=1)

    def scores(mode: str, coef: float) -> dict[int, torch.Tensor]:
        stgc = STGCConfig(beta=1e-9, mode=mode)
        method = ObjectiveSet(
            MethodConfig(name="mole+stgc", objectives=(MoLEBalanceConfig(coef=coef), stgc)), MoEConfig(**moe)
        )
        model.zero_grad(set_to_none=True)
        result = method.step_loss(model, batch, 0)
        result.loss.backward()
        return {layer: lc.score_A.detach().clone() for layer, lc in result.observer.layers.items()}

    fused, two_pass = scores("fused", 10.0), scores("two_pass", 10.0)
    assert fused.keys() == two_pass.keys() and len(fused) == 2
    for layer in fused:
        torch.testing.assert_close(two_pass[layer], fused[layer], rtol=1e-4, atol=1e-6)
    without = scores("two_pass", 0.0)
    assert any(not torch.allclose(without[layer], two_pass[layer], atol=1e-4) for layer in two_pass)


def test_checkpoint_keeps_experts_apart_and_loads_as_one_model(tmp_path):
    _, model = _mole("phi")
    _random_deltas(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / ADAPTERS_NAME).exists() and (tmp_path / BASE_NAME).exists()
    assert not (tmp_path / "model.safetensors").exists()
    from safetensors import safe_open

    with safe_open(str(tmp_path / ADAPTERS_NAME), "pt") as f:
        adapters = set(f.keys())
    groups = parameter_groups(model)
    assert adapters == {n for n, g in groups.items() if g in ("experts", "router")}
    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = loaded.state_dict()
    assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items())
    assert isinstance(loaded.moe_blocks[0].experts, LoRAExperts)
    assert loaded.config.moe_config == MOLE


def test_bad_rank_is_one_clear_error(capsys):
    with pytest.raises(ValueError, match=r"moe.experts.rank=0 is invalid; use a positive integer"):
        LoRAExpertsConfig(rank=0)
    with pytest.raises(ValueError, match=r"rank=65 is larger than the smallest FFN projection dimension 64"):
        _mole(moe=MOLE.replace(experts=LoRAExpertsConfig(rank=65)))
    assert main(["train", "tiny_mole", "model.moe.experts.rank=-1", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert "moe.experts.rank=-1 is invalid" in err and len(err.splitlines()) == 1
