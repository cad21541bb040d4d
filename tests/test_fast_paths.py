"""Every registered fast path equals the eager parts it implements (docs/extending.md): for each (router,
bank) pair in ``stgc.moe.fused.FUSED_PAIRS``, the fused block and the eager block holding the same weights
give the same outputs, every gradient (input, router, experts), the same routing record and the same
conflict masks, with and without padding, token dropping, the Triton kernels (Triton's interpreter on
CPU) and STGC's fused CEL gradient."""

from __future__ import annotations

import pytest
import torch

import stgc.moe.fused.passes
from stgc.config import MoEConfig
from stgc.conflict import ConflictObserver
from stgc.moe import MoEBlock, RoutingContext, routing_context
from stgc.moe.fused import FUSED_PAIRS
from stgc.objectives.config import METHODS

D, F_ = 16, 24
PAIRS = sorted((r.name, b.name) for r, b in FUSED_PAIRS)


def _run(cfg: MoEConfig, ffn: str, state: dict | None, masked: bool, observer: ConflictObserver | None):
    torch.manual_seed(0)
    block = MoEBlock(cfg, D, F_, ffn, layer_idx=3).train()
    if state is None:
        with torch.no_grad():
            if ffn == "gelu":
                block.experts.b_in.normal_()
                block.experts.b_out.normal_()
    else:
        block.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 19, D, generator=g, dtype=torch.float64)
    block = block.double()
    block.router.double()
    x.requires_grad_()
    mask = torch.ones(2, 19, dtype=torch.bool)
    if masked:
        mask[0, 15:] = False
    # modality codes and instruction clusters for the routers that read them (MoMa, MoCLE); the others
    # ignore them
    modality = torch.randint(0, 2, (2, 19), generator=g)
    ctx = RoutingContext(
        token_mask_BT=mask if masked else None,
        records=[],
        observer=observer,
        modality_BT=modality,
        cluster_B=torch.tensor([1, 3]),
    )
    with routing_context(block, ctx):
        y = block(x)
    r = ctx.records[0]
    dy = torch.randn(2, 19, D, generator=g, dtype=torch.float64)
    loss = (y * dy).sum() + 0.3 * r.aux_loss + 0.05 * r.logits_TE.square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    grads["input"] = x.grad.clone()
    return block, y.detach(), grads, r


def _masks(observer: ConflictObserver, K: int) -> dict[tuple[int, int], tuple[bool, float]]:
    (layer,) = observer.layers.values()
    out = {}
    for t, e, s, c, k in zip(
        layer.token_A.tolist(),
        layer.expert_A.tolist(),
        layer.score_A.tolist(),
        layer.conflict_A.tolist(),
        layer.considered_A.tolist(),
        strict=True,
    ):
        if k:
            out[(t, e)] = (c, s)
    return out


@pytest.mark.parametrize("pair", PAIRS, ids=["+".join(p) for p in PAIRS])
@pytest.mark.parametrize("ffn", ["swiglu", "gelu"])
@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(masked=True),
        dict(masked=True, triton=True),
        dict(masked=True, capacity_factor=1.0),
        dict(top_k=1, triton=True),
        dict(masked=True, route_padding=True),
    ],
    ids=["plain", "padding", "padding-triton", "dropping", "top1-triton", "route-padding"],
)
def test_fused_equals_eager(pair, ffn, case, monkeypatch):
    case = dict(case)
    masked, triton = case.pop("masked", False), case.pop("triton", False)
    monkeypatch.setattr(stgc.moe.fused.passes, "TRITON_ON_CPU", triton)
    router, bank = pair
    # a peer router with the settings of the method preset that uses it (AdaMoE: top_k=3), then the case's
    preset = next((p.moe for p in METHODS.values() if p.moe.get("router", {}).get("name") == router), {})
    settings = {"router": {"name": router}, **preset, "experts": {"name": bank}, **case}
    if "capacity_factor" in case:
        settings["min_capacity"] = 0
    try:
        MoEConfig(**settings)
    except ValueError as refused:  # e.g. AdaMoE refuses top_k=1, MoMa route_padding
        pytest.skip(f"{router} refuses this case: {refused}")
    results = {}
    state = None
    for impl in ("auto", "eager"):
        cfg = MoEConfig(implementation=impl, **settings)
        obs = ConflictObserver(scale=0.2)
        block, y, grads, record = _run(cfg, ffn, state, masked, obs)
        state = state or block.state_dict()
        results[block.implementation] = (y, grads, record, _masks(obs, cfg.top_k))
    assert set(results) == {"fused", "eager"}
    (y_f, g_f, r_f, m_f), (y_e, g_e, r_e, m_e) = results["fused"], results["eager"]
    tol = dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(y_f, y_e, **tol)
    assert g_f.keys() == g_e.keys()
    for name in g_e:
        torch.testing.assert_close(g_f[name], g_e[name], **tol, msg=name)
    assert torch.equal(r_f.topk_idx_TK, r_e.topk_idx_TK)
    assert torch.equal(r_f.executed_TK(), r_e.executed_TK())
    for field in ("weights_TK", "probs_TE", "logits_TE", "aux_loss"):
        torch.testing.assert_close(getattr(r_f, field), getattr(r_e, field), **tol, msg=field)
    assert torch.equal(r_f.tokens_per_expert_E, r_e.tokens_per_expert_E)
    assert m_f.keys() == m_e.keys() and m_f, "the same (token, expert) pairs are scored"
    for key in m_e:
        assert m_f[key][0] == m_e[key][0], key
        assert m_f[key][1] == pytest.approx(m_e[key][1], abs=1e-9)
    assert any(c for c, _ in m_e.values()), "no conflict at all: the CEL gradient was not exercised"
