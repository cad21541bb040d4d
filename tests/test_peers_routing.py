"""Peer routing methods I (docs/peers_routing.md): each method's defining property, STGC on top of each
(the pairs it tests are the executed ones), and one clear error for each bad setting.

- CompeteSMoE: the winners of a competition step are the top-k of the softplus-mean responses of a dense
  pass computed here independently; the schedule (warm-up, cap, rank 0's draw on every rank, state round
  trip); evaluation routes by the router alone.
- AdaMoE: a token routed only to null experts gets output 0 and costs no expert FLOPs (counted); nothing
  is NaN; null rows start as copies, so the upcycled layer starts as the top-2 baseline; the pooled
  balance loss.
- MoMa: an image token never reaches a text expert (and the reverse), token- and expert-choice, in
  training, evaluation and decoding of the real model.
- MoCLE: the cluster embedding enters the router; the sample gate routes every token of a sample alike.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stgc.config import MoEConfig
from stgc.moe import MoEBlock, RoutingContext, routing_context
from stgc.objectives.config import METHODS, CompeteSMoEConfig
from stgc.objectives.set import ObjectiveSet
from stgc.recipes import stgc_variant, tiny, with_method
from tests.toy_moe import toy_batch, toy_model

D, F_ = 16, 24


def _preset_moe(method: str, **changes) -> MoEConfig:
    return MoEConfig.from_dict({**MoEConfig().to_dict(), **METHODS[method].moe, **changes})


def _block(moe: MoEConfig, ffn: str = "swiglu", seed: int = 0) -> MoEBlock:
    torch.manual_seed(seed)
    block = MoEBlock(moe, D, F_, ffn, layer_idx=0).double().train()
    with torch.no_grad():
        if ffn == "gelu":
            block.experts.b_in.normal_()
            block.experts.b_out.normal_()
    return block


def _forward(block: MoEBlock, x: torch.Tensor, **ctx_fields):
    ctx = RoutingContext(records=[], **ctx_fields)
    with routing_context(block, ctx):
        y = block(x)
    return y, ctx.records[0]


def _expert_outputs(bank, x_TD: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, written out from the bank's weights (independent of the bank's code)."""
    outs = []
    for e in range(bank.num_experts):
        if bank.ffn == "swiglu":
            gate, up = (x_TD @ bank.w_in[e].T).split(bank.intermediate_size, dim=-1)
            outs.append((F.silu(gate) * up) @ bank.w_out[e].T)
        else:
            h = x_TD @ bank.w_in[e].T + bank.b_in[e]
            outs.append(F.gelu(h, approximate="tanh") @ bank.w_out[e].T + bank.b_out[e])
    return torch.stack(outs, 1)


# --------------------------------------------------------------------------------------------- CompeteSMoE


@pytest.mark.parametrize("ffn", ["swiglu", "gelu"])
@pytest.mark.parametrize("implementation", ["auto", "eager"])
def test_competesmoe_winners_are_topk_of_softplus_mean_responses(ffn, implementation):
    moe = _preset_moe("competesmoe", implementation=implementation)
    block = _block(moe, ffn)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    y, r = _forward(block, x, dense_layers=frozenset({0}))
    o_TED = _expert_outputs(block.experts, x.reshape(-1, D)).detach()
    s_TE = F.softplus(o_TED).mean(-1)
    s_top, winners = s_TE.topk(moe.top_k, dim=-1)
    assert torch.equal(r.topk_idx_TK, winners)
    torch.testing.assert_close(r.weights_TK.detach(), s_top / s_top.sum(-1, keepdim=True))
    expected = (
        o_TED.gather(1, winners[..., None].expand(-1, -1, D)) * (s_top / s_top.sum(-1, True))[..., None]
    )
    torch.testing.assert_close(y.detach().reshape(-1, D), expected.sum(1))
    # the record carries the router's own distribution (what distillation and L_cel act on)
    z = block.router.logits(x.reshape(-1, D))
    torch.testing.assert_close(r.probs_TE.detach(), z.softmax(-1).detach())
    # and without the competition (any step not scheduled, and always at evaluation) the router decides
    block.eval()
    _, r_eval = _forward(block, x, dense_layers=None)
    assert torch.equal(r_eval.topk_idx_TK, z.softmax(-1).topk(moe.top_k, -1).indices)


def _competesmoe(**settings) -> ObjectiveSet:
    config = with_method(tiny(), "competesmoe", **settings)
    return ObjectiveSet(config.method, config.model.moe)


def test_competesmoe_schedule_warmup_cap_rate_and_state():
    objectives = _competesmoe(rate=0.4, max_layers=2)
    comp = objectives.items[-1]
    layers = (0, 2, 4, 6, 8)
    comp.prepare(max_steps=400, moe_layers=layers, seed=3)
    counts = [len(comp.dense_layers(s)) for s in range(400)]
    assert sum(counts[:20]) == 0, "the first 5% of the steps are router-only"
    assert max(counts) == 2, "at most max_layers layers compete in one step"
    share = sum(counts) / (380 * len(layers))
    assert 0.3 < share < 0.45, share  # rate 0.4 per layer (a few draws lost to the cap)
    assert all(set(comp.dense_layers(s)) <= set(layers) for s in range(400))
    assert objectives.routing_context(counts.index(2), None).dense_layers == comp.dense_layers(
        counts.index(2)
    )
    # saved with the checkpoint and restored on resume (a resumed run draws nothing new)
    state = objectives.state_dict()
    other = _competesmoe(rate=0.4, max_layers=2)
    other.items[-1].prepare(max_steps=400, moe_layers=layers, seed=99)
    assert [other.items[-1].dense_layers(s) for s in range(400)] != [comp.dense_layers(s) for s in range(400)]
    other.load_state_dict(state)
    assert [other.items[-1].dense_layers(s) for s in range(400)] == [comp.dense_layers(s) for s in range(400)]
    with pytest.raises(ValueError, match="no schedule"):
        _competesmoe().items[-1].context(0)


def _draw_on_rank(rank: int, world: int, port: int, out) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    comp = _competesmoe(rate=0.3).items[-1]
    comp.prepare(max_steps=200, moe_layers=(0, 2), seed=rank)  # a different seed per rank
    out.put((rank, comp.schedule_SL.tolist()))
    torch.distributed.destroy_process_group()


def test_competesmoe_schedule_is_rank0s_on_every_rank():
    import socket

    mp = torch.multiprocessing.get_context("fork")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Queue()
    procs = [mp.Process(target=_draw_on_rank, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got[0] == got[1] and any(any(row) for row in got[0])
    alone = _competesmoe(rate=0.3).items[-1]
    alone.prepare(max_steps=200, moe_layers=(0, 2), seed=0)
    assert alone.schedule_SL.tolist() == got[0]


def test_competesmoe_objective_refuses_another_router():
    objectives = ObjectiveSet(with_method(tiny(), "competesmoe").method, MoEConfig())
    with pytest.raises(ValueError, match="router.name='competesmoe'"):
        objectives.check((0, 2))


# ------------------------------------------------------------------------------------------------- AdaMoE


def _null_batch(moe: MoEConfig):
    """Router rows: true rows 0, null rows c_j * u; tokens with x.u > 0 pick only null experts, the others
    three true experts (ties to the lower index)."""
    block = _block(moe)
    u = torch.randn(D, dtype=torch.float64)
    with torch.no_grad():
        block.router.weight.zero_()
        for j, c in enumerate((10.0, 11.0, 12.0, 13.0)):
            block.router.weight[4 + j] = c * u
    x = torch.randn(3, 8, D, dtype=torch.float64)
    null_only_T = (x.reshape(-1, D) @ u) > 0
    return block, x.requires_grad_(), null_only_T


@pytest.mark.parametrize("implementation", ["auto", "eager"])
def test_adamoe_null_only_token_gets_zero_and_costs_no_expert_flops(implementation):
    from torch.utils.flop_counter import FlopCounterMode

    moe = _preset_moe("adamoe", implementation=implementation)
    block, x, null_only_T = _null_batch(moe)
    assert 0 < int(null_only_T.sum()) < null_only_T.numel()
    with FlopCounterMode(display=False) as counter:
        y, r = _forward(block, x)
        (y.square().sum() + 0.1 * r.aux_loss).backward()
    y_TD = y.detach().reshape(-1, D)
    assert torch.equal(y_TD[null_only_T], torch.zeros_like(y_TD[null_only_T]))
    assert (y_TD[~null_only_T].abs().sum(-1) > 0).all()
    assert not r.executed_TK()[null_only_T].any() and (r.topk_idx_TK[null_only_T] >= 4).all()
    for t in (y, r.weights_TK, x.grad, *[p.grad for p in block.parameters()]):
        assert torch.isfinite(t).all()
    # FLOPs: the router's (forward, input and weight gradients) plus 18 D F per executed assignment
    # (SwiGLU: 6 D F forward, twice that backward); null assignments add nothing
    T, R = null_only_T.numel(), block.router.width
    executed = int(r.executed_TK().sum())
    assert executed == 3 * int((~null_only_T).sum())
    assert counter.get_total_flops() == 3 * 2 * T * D * R + 18 * D * F_ * executed


def test_adamoe_null_rows_start_as_copies_so_the_upcycled_layer_is_the_top2_baseline():
    ada = _block(_preset_moe("adamoe"))
    w = ada.router.weight
    assert torch.equal(w[4:], w[:4])
    ada.router.init_weights(0.02)
    assert torch.equal(ada.router.weight[4:], ada.router.weight[:4])
    base = _block(MoEConfig())
    base.load_state_dict({**ada.state_dict(), "router.weight": ada.router.weight[:4].clone()})
    x = torch.randn(2, 7, D, dtype=torch.float64)
    y_ada, r_ada = _forward(ada, x)
    y_base, r_base = _forward(base, x)
    torch.testing.assert_close(y_ada, y_base)
    assert (r_ada.executed_TK().sum(-1) == 2).all()


def test_adamoe_balance_pools_the_null_experts():
    from stgc.moe.routers.adamoe import pooled_null_balance

    probs = torch.tensor([[0.4, 0.1, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4]])  # 2 true + 2 null columns
    topk = torch.tensor([[0, 2], [3, 2]])
    count = torch.tensor([True, True])
    # assignment shares f = [1, 0, 2, 1] / 4 -> nulls pooled: [0.25, 0, 0.375, 0.375]
    f = torch.tensor([0.25, 0.0, 0.375, 0.375])
    P = probs.mean(0)
    torch.testing.assert_close(pooled_null_balance(probs, topk, count, 2), 4 * (f * P).sum())


def test_adamoe_diagnostics():
    config = with_method(tiny(), "adamoe")
    moe = config.model.moe
    model = toy_model("swiglu", num_layers=2, **moe.to_dict())
    objectives = ObjectiveSet(config.method, moe)
    batch = toy_batch(pad=2)
    batch["modality"] = (torch.arange(8) < 3).long().expand(3, 8)
    result = objectives.step_loss(model, batch, 0)
    m = objectives.metrics(result)
    assert m["adamoe/true_experts_mean"] == 2.0  # copies: the top-2 baseline at step 0
    assert sum(m[f"adamoe/true_k{j}"] for j in range(4)) == pytest.approx(1.0)
    assert {"adamoe/image/true_experts_mean", "adamoe/text/true_experts_mean"} <= set(m)


# --------------------------------------------------------------------------------------------------- MoMa


@pytest.mark.parametrize("image_routing", ["token_choice", "expert_choice"])
def test_moma_never_sends_an_image_token_to_a_text_expert(image_routing):
    from tests.conftest import image_batch, tiny_model

    moe = _preset_moe("moma").to_dict()
    moe["router"]["image_routing"] = image_routing
    if image_routing == "expert_choice":
        moe["top_k"] = 2
    model = tiny_model("llama", **moe)
    batch = image_batch(model, batch=3, text_len=6, pad_right=2)
    image_BS = batch["input_ids"] == model.config.image_token_id
    Gi = 2
    for mode in ("train", "eval"):
        getattr(model, mode)()
        out = model(**batch, output_routing=True)
        for r in out.routing_records:
            ran_TK = r.executed_TK()
            image_T = image_BS.reshape(-1)
            assert ran_TK.any(-1)[image_T].all() or image_routing == "expert_choice"
            assert (r.topk_idx_TK[image_T] < Gi)[ran_TK[image_T]].all(), "image token in a text expert"
            assert (r.topk_idx_TK[~image_T] >= Gi)[ran_TK[~image_T]].all(), "text token in an image expert"
            assert r.probs_TE[image_T][:, Gi:].eq(0).all() and r.probs_TE[~image_T][:, :Gi].eq(0).all()
            if image_routing == "expert_choice":
                # each image expert takes ceil(n * k / G) = n tokens of each sample's 16-token image block
                picked_BE = torch.zeros(3, Gi, dtype=torch.long)
                for t, k in ran_TK.nonzero().tolist():
                    if image_T[t]:
                        picked_BE[t // image_BS.shape[1], r.topk_idx_TK[t, k]] += 1
                assert picked_BE.eq(math.ceil(int(image_BS[0].sum()) * 2 / Gi)).all()
    # decoding: every generated token is text and routes in the text group
    ctx = RoutingContext(records=[])
    model.eval()
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=3, do_sample=False, routing_ctx=ctx)
    decode = [r for r in ctx.records if r.topk_idx_TK.shape[0] == 3]
    assert decode and all((r.topk_idx_TK[r.executed_TK()] >= Gi).all() for r in decode)


def test_moma_modality_codes_match_the_model():
    from stgc.modeling import MODALITY_IMAGE
    from stgc.moe.routers.moma import IMAGE_CODE
    from stgc.objectives.peers import IMAGE_CODE as OBJ_IMAGE_CODE

    assert IMAGE_CODE == OBJ_IMAGE_CODE == MODALITY_IMAGE


def test_moma_without_modality_is_an_error_not_a_fallback():
    block = _block(_preset_moe("moma"))
    with pytest.raises(ValueError, match="modality"):
        _forward(block, torch.randn(1, 4, D, dtype=torch.float64))


def test_moma_diagnostics_within_groups():
    config = with_method(tiny(), "moma")
    moe = config.model.moe
    model = toy_model("swiglu", num_layers=2, **moe.to_dict())
    objectives = ObjectiveSet(config.method, moe)
    batch = toy_batch()
    batch["modality"] = (torch.arange(8) < 4).long().expand(3, 8)
    m = objectives.metrics(objectives.step_loss(model, batch, 0))
    assert m["moma/cross_group"] == 0
    for group in ("image", "text"):
        shares = [m[f"moma/layer0/{group}_share_e{j}"] for j in range(2)]
        assert sum(shares) == pytest.approx(1.0) and m[f"moma/{group}_imbalance"] >= 1


# -------------------------------------------------------------------------------------------------- MoCLE


def test_mocle_cluster_embedding_joins_the_router():
    block = _block(_preset_moe("mocle", router={"name": "mocle", "num_clusters": 4}))
    x = torch.randn(2, 5, D, dtype=torch.float64)
    with torch.no_grad():
        block.router.cluster_embedding.normal_()
    _, r = _forward(block, x, cluster_B=torch.tensor([1, 3]))
    emb = block.router.cluster_embedding[torch.tensor([1, 3])].repeat_interleave(5, 0)
    expected = x.reshape(-1, D) @ block.router.weight.T + emb @ block.router.cluster_weight.T
    torch.testing.assert_close(r.logits_TE.detach(), expected.detach().float())
    with pytest.raises(ValueError, match="instruction cluster"):
        _forward(block, x)


def test_mocle_sample_gate_routes_every_token_of_a_sample_alike():
    moe = _preset_moe("mocle", top_k=1, router={"name": "mocle", "num_clusters": 4, "gate": "sample_top1"})
    block = _block(moe)
    block.eval()
    _, r = _forward(block, torch.randn(3, 6, D, dtype=torch.float64), cluster_B=torch.tensor([0, 2, 2]))
    chosen = r.topk_idx_TK[:, 0].reshape(3, 6)
    assert (chosen == chosen[:, :1]).all() and torch.equal(chosen[1], chosen[2])
    assert (r.weights_TK > 0).all() and (r.weights_TK < 1).all()  # p, not renormalised


# -------------------------------------------------------------------------------------------- STGC on top


@pytest.mark.parametrize("method", ["competesmoe", "adamoe", "moma", "mocle"])
def test_stgc_tests_the_executed_assignments(method):
    config = stgc_variant(with_method(tiny(), method))
    moe = config.model.moe
    model = toy_model("swiglu", num_layers=2, **moe.to_dict())
    objectives = ObjectiveSet(config.method, moe)
    objectives.prepare(max_steps=100, moe_layers=(0, 1), seed=0)
    step = 0
    if method == "competesmoe":  # a competition step of layer 0
        step = next(s for s in range(100) if 0 in objectives.items[-2].dense_layers(s))
    batch = toy_batch(pad=2)
    batch["modality"] = (torch.arange(8) < 3).long().expand(3, 8)
    batch["cluster_ids"] = torch.tensor([0, 5, 9])
    result = objectives.step_loss(model, batch, step)
    result.loss.backward()
    assert config.method.name == f"{method}+stgc"
    for r in result.records:
        layer = result.observer.layers[r.layer_idx]
        tested = {
            (t, e)
            for t, e, c in zip(layer.token_A.tolist(), layer.expert_A.tolist(), layer.considered_A.tolist())
            if c
        }
        executed = {(t, int(r.topk_idx_TK[t, k])) for t, k in r.executed_TK().nonzero().tolist()}
        assert tested and tested <= executed
        assert all(e < moe.num_experts for _, e in tested)  # never a null expert
        if method == "competesmoe" and r.layer_idx == 0:
            assert "responses_TE" in r.extras  # the winners were tested
    assert result.logs()["loss/cel"] > 0


# -------------------------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    "moe, words",
    [
        (dict(router={"name": "adamoe"}, top_k=9), "top_k=9 is invalid for a router of width 8"),
        (dict(router={"name": "adamoe"}, top_k=1), "top_k=1 is too small for AdaMoE"),
        (dict(router={"name": "moma", "image_experts": 3}), "must add up to moe.num_experts=4"),
        (dict(router={"name": "moma"}, top_k=3), "larger than a MoMa group"),
        (dict(router={"name": "mocle", "num_clusters": 1}), "num_clusters=1 is invalid"),
    ],
)
def test_bad_method_settings_raise_one_clear_error(moe, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        MoEConfig(**moe)


def test_competesmoe_settings_are_checked():
    with pytest.raises(ValueError, match="warmup"):
        CompeteSMoEConfig(warmup=1.5)
