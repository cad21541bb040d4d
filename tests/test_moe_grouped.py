"""The two ways the MoE block issues its expert products give the same numbers: ``torch._grouped_mm`` with
device-side offsets (the CUDA bf16 path, no host sync) and one product per expert sized on the host (CPU,
fp64). Both run here on CPU (torch's grouped GEMM has a CPU fallback for fp32); plus the SwiGLU shortcut of
the conflict scores (g1's sums and dot products taken from g2 and W_out) against the direct computation, and
the Triton activation kernels against eager code."""

from __future__ import annotations

import pytest
import torch

from stgc.config import MoEConfig
from stgc.conflict import ConflictObserver, conflict_scores
from stgc.moe import MoEBlock, RoutingContext, routing_context, use_grouped_mm

D, F_ = 16, 24


def _run(mode: str, ffn: str, cfg: MoEConfig, x, mask, dy):
    torch.manual_seed(0)
    block = MoEBlock(cfg, D, F_, ffn, layer_idx=0).train()
    block.expert_products = mode
    grouped = mode != "per_expert"
    if ffn == "gelu":
        with torch.no_grad():
            block.experts.b_in.normal_()
            block.experts.b_out.normal_()
    assert use_grouped_mm(x, (D, F_, 2 * F_), block.expert_products) == grouped
    obs = ConflictObserver(scale=0.1)
    xi = x.clone().requires_grad_()
    ctx = RoutingContext(token_mask_BT=mask, records=[], observer=obs)
    with routing_context(block, ctx):
        y = block(xi)
    (y * dy).sum().backward()
    grads = {n: p.grad for n, p in block.named_parameters()}
    return y, xi.grad, grads, obs.layers[0], ctx.records[0]


@pytest.mark.parametrize("ffn", ["swiglu", "gelu"])
@pytest.mark.parametrize("capacity", [None, 1.0])
def test_grouped_and_per_expert_products_agree(ffn, capacity):
    """Outputs, every gradient (router, experts, biases, input) and the conflict scores agree between the
    product forms (``EXPERT_PRODUCTS``: all grouped, grouped forward with a per-expert backward, all per
    expert), with padding and with capacity dropping (dropped and padding rows are computed with weight 0:
    they change nothing)."""
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=capacity, min_capacity=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 11, D, generator=g)
    dy = torch.randn(3, 11, D, generator=g)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[0, 8:] = mask[2, 5:] = False
    loop = _run("per_expert", ffn, cfg, x, mask, dy)
    for mode in ("grouped", "grouped_forward"):
        _agree(_run(mode, ffn, cfg, x, mask, dy), loop, mask, capacity)


def _agree(grouped, loop, mask, capacity):
    record = grouped[4]
    if capacity is not None:  # the capacity case must drop real assignments, or it tests nothing
        assert bool((~record.kept_TK & record.token_mask_T[:, None]).any())
    torch.testing.assert_close(grouped[0], loop[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grouped[1], loop[1], rtol=1e-5, atol=1e-6)
    assert grouped[2].keys() == loop[2].keys()
    for name in loop[2]:
        torch.testing.assert_close(grouped[2][name], loop[2][name], rtol=1e-5, atol=1e-6, msg=name)
    lg, ll = grouped[3], loop[3]
    assert torch.equal(lg.token_A, ll.token_A) and torch.equal(lg.expert_A, ll.expert_A)
    assert torch.equal(lg.considered_A, ll.considered_A)
    torch.testing.assert_close(lg.score_A, ll.score_A, rtol=1e-4, atol=1e-5)
    # padding rows are never considered
    assert not bool((lg.considered_A & ~mask.reshape(-1)[lg.token_A]).any())
    # padding tokens get no output from the experts
    assert float(grouped[0].detach()[~mask].abs().max()) == 0.0


@pytest.mark.parametrize("score", ["mean", "concat", "g1", "g2"])
def test_swiglu_shortcut_equals_direct_scores(score):
    """With g1 = g2 W_out[e], scores from (g2, W_out, |g1|^2) equal scores from g1 and g2 (float64)."""
    g = torch.Generator().manual_seed(0)
    A, E = 40, 3
    w_out = torch.randn(E, D, F_, generator=g, dtype=torch.float64)
    expert = torch.sort(torch.randint(0, E, (A,), generator=g)).values
    g2 = torch.randn(A, D, generator=g, dtype=torch.float64)
    g1 = torch.einsum("ad,adf->af", g2, w_out[expert])
    valid = torch.rand(A, generator=g) > 0.2
    direct = conflict_scores(g1, g2, expert, valid, E, score=score)
    shortcut = conflict_scores(
        g1, g2, expert, valid, E, score=score, w_out_EDF=w_out, sq1_A=g1.square().sum(-1)
    )
    assert torch.equal(direct[1], shortcut[1])
    torch.testing.assert_close(shortcut[0], direct[0], rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["auto", "grouped_forward"])
def test_block_and_observer_never_sync_on_cuda(mode):
    """On the CUDA path neither the block's forward and backward nor the conflict observer synchronises
    (torch's sync debug mode turns any synchronising call into an error). The one wait is the backward's
    for the expert sizes the forward copied to the host (an event long complete by then, which the debug
    mode does not count); the copy itself is asynchronous."""
    torch.manual_seed(0)
    block = MoEBlock(MoEConfig(), 256, 512, "swiglu", 0).cuda().bfloat16().train()
    block.router.float()
    block.expert_products = mode  # (auto: all grouped at this size)
    x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(4, 128, dtype=torch.bool, device="cuda")
    mask[1, 100:] = False
    for step in range(2):  # the first call may compile kernels
        obs = ConflictObserver(scale=0.01)
        if step == 1:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with routing_context(block, RoutingContext(token_mask_BT=mask, records=[], observer=obs)):
                y = block(x)
            y.float().square().mean().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(block.router.weight.grad).all()
    if mode == "grouped_forward":  # the split products give the grouped ones' gradients
        # (without the observer: a conflict score at the threshold may flip with the products' rounding,
        # and the CEL gradient with it; bf16 products summed in another order: compared in norm)
        grads = {}
        for products in ("grouped_forward", "grouped"):
            block.expert_products = products
            block.zero_grad()
            with routing_context(block, RoutingContext(token_mask_BT=mask, records=[])):
                y = block(x)
            y.float().square().mean().backward()
            grads[products] = {n: p.grad.float().clone() for n, p in block.named_parameters()}
        for n, g in grads["grouped"].items():
            err = float((grads["grouped_forward"][n] - g).norm() / g.norm().clamp_min(1e-12))
            assert err < 1e-2, (n, err)


def test_triton_swiglu_passes_equal_eager():
    """The Triton activation forward and backward (with |grad_a|^2 per row) equal the plain elementwise
    code (on CPU: Triton's interpreter)."""
    pytest.importorskip("triton")
    from stgc.moe.experts.ffn import act_forward as _act_forward
    from stgc.moe.fused.expert_kernels import swiglu_backward, swiglu_forward
    from stgc.moe.fused.passes import act_backward as _act_backward

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    A, F = 37, 300  # neither a multiple of its block: the masked tails
    h = torch.randn(A, 2 * F, generator=g).to(dev, torch.bfloat16)
    ga = torch.randn(A, F, generator=g).to(dev, torch.bfloat16)
    ref_h, ref_sq = _act_backward("swiglu", h, ga, F, True)
    out_h, out_sq = swiglu_backward(h, ga, True)
    torch.testing.assert_close(out_h, ref_h, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out_sq, ref_sq, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(swiglu_backward(h, ga, False), ref_h, rtol=1e-2, atol=1e-2)
    ref_a = _act_forward("swiglu", h.float(), F)
    torch.testing.assert_close(swiglu_forward(h).float(), ref_a, rtol=1e-2, atol=1e-2)


def test_auto_products_split_the_backward_from_the_threshold_on(monkeypatch):
    """``auto`` (on CUDA bf16) keeps every product grouped below PER_EXPERT_BACKWARD_MIN_ROWS rows per
    expert and runs the backward's per expert from there on; the explicit modes ignore the size. Without
    grad mode nothing splits (no backward will come: the forward copies no sizes to the host)."""
    from stgc.moe import dispatch

    monkeypatch.setattr(dispatch, "PER_EXPERT_BACKWARD_MIN_ROWS", 8)
    offsets = torch.tensor([4, 8, 12, 16])

    def split(tokens: int, mode: str) -> bool:  # (grouped=True: as on CUDA bf16)
        return dispatch.ExpertGroups.for_rows(tokens * 2, offsets, 4, mode, True).per_expert_backward

    assert not split(15, "auto") and split(16, "auto")  # 30 rows < 4 x 8 <= 32 rows
    assert split(2, "grouped_forward") and not split(64, "grouped")
    with torch.no_grad():
        assert not split(16, "auto") and not split(2, "grouped_forward")
