"""Launch shapes (``stgc.moe.fused.launch``) of the MoE block's memory-bound Triton kernels, swept on one GPU
at the bench shape (D 2048, E 4, top-2, bf16; T tokens): the routing (both launches), its backward, the
combine and the row dot of the backward. Each configuration is timed with
``triton.testing.do_bench_cudagraph`` (the calls replayed from a CUDA graph, so that the GPU time is
measured and not the host's time to issue the launches; median) and its outputs are checked against the
module's current shape; the ideal time is the bytes the kernel must move over the HBM bandwidth.

    python -m stgc.bench.kernel_tuning [tokens ...] > results/bench/kernel_tuning.txt

"""

from __future__ import annotations

import itertools
import sys

import torch
from triton.testing import do_bench_cudagraph

from stgc.moe.fused import launch as K
from stgc.moe.fused.expert_kernels import combine, rowdot_scale
from stgc.moe.fused.routing_kernels import route_and_dispatch, route_backward

D, E, TOPK, HBM_TBS = 2048, 4, 2, 4.8  # H200: 4.8 TB/s


def _inputs(T: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = torch.device("cuda")
    x = torch.randn(T, D, device=dev, dtype=torch.bfloat16, generator=g)
    w = torch.randn(E, D, device=dev, generator=g) * 0.02
    r = route_and_dispatch(x, w, None, TOPK, False, True)
    A = T * TOPK
    return dict(
        x=x,
        w=w,
        r=r,
        o=torch.randn(A, D, device=dev, dtype=torch.bfloat16, generator=g),
        dy=torch.randn(T, D, device=dev, dtype=torch.bfloat16, generator=g),
        g_logits=torch.randn(T, E, device=dev, generator=g),
        g_weights=torch.randn(T, TOPK, device=dev, generator=g),
        g_aux=torch.ones((), device=dev),
    )


def _cases(v: dict) -> dict:
    r = v["r"]
    T = v["x"].shape[0]
    A = T * TOPK
    b = 2  # bytes per bf16
    return {
        # name: (call, tunables {global: values}, bytes moved)
        "route_and_dispatch": (
            lambda: route_and_dispatch(v["x"], v["w"], None, TOPK, False, True),
            {"ROUTE_BLOCK_T": (16, 32, 64), "ROUTE_BLOCK_D": (64, 128, 256), "ROUTE_WARPS": (2, 4, 8)},
            T * D * b * 2 + A * D * b,  # x read twice (router, gather), x_A written
        ),
        "gather (dispatch)": (
            lambda: route_and_dispatch(v["x"], v["w"], None, TOPK, False, True),
            {"GATHER_BLOCK_D": (128, 256, 512)},
            T * D * b * 2 + A * D * b,
        ),
        "route_backward": (
            lambda: route_backward(
                v["x"],
                v["w"],
                None,
                False,
                r.probs_TE,
                r.topk_TK,
                r.weights_TK,
                r.f_E,
                r.n_real,
                v["g_logits"],
                None,
                v["g_weights"],
                v["g_aux"],
            ),  # fmt: skip
            {
                "ROUTE_BWD_BLOCK_T": (16, 32, 64),
                "ROUTE_BWD_BLOCK_D": (64, 128, 256),
                "ROUTE_BWD_WARPS": (2, 4, 8),
            },
            T * D * b * 2,  # x read, dx written
        ),
        "combine": (
            lambda: combine(v["o"], r.pos_TK, r.weights_TK),
            {"COMBINE_BLOCK_T": (8, 16, 32, 64), "COMBINE_BLOCK_D": (128, 256, 512), "COMBINE_WARPS": (4, 8)},
            A * D * b + T * D * b,
        ),
        "rowdot_scale": (
            lambda: rowdot_scale(v["dy"], r.token_A, v["o"], r.w_A),
            {"ROW_BLOCK": (16, 32, 64), "ROWDOT_BLOCK_D": (64, 128, 256), "ROWDOT_WARPS": (4, 8)},
            3 * A * D * b,  # dy (by token) and o read, g2 written
        ),
    }


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    if hasattr(out, "__dataclass_fields__"):
        return [t for f in out.__dataclass_fields__ for t in _flat(getattr(out, f))]
    return []


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the summation order (bf16 outputs: one rounding step)."""
    tol = 2e-2 if a.dtype == torch.bfloat16 else 1e-3
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)


def sweep(T: int) -> None:
    v = _inputs(T)
    print(f"== {T} tokens (D {D}, E {E}, top-{TOPK}, bf16)")
    for name, (call, grid, nbytes) in _cases(v).items():
        current = {k: getattr(K, k) for k in grid}
        ref = [t.clone() for t in _flat(call())]
        ideal = nbytes / (HBM_TBS * 1e12) * 1e3
        results = []
        for combo in itertools.product(*grid.values()):
            setting = dict(zip(grid, combo, strict=True))
            for k, val in setting.items():
                setattr(K, k, val)
            try:
                out = _flat(call())
                ok = all(_close(a, b) for a, b in zip(out, ref, strict=True))
                ms = do_bench_cudagraph(call, rep=20, return_mode="median")
            except Exception as exc:  # (a shape Triton cannot compile: report it, keep sweeping)
                ok, ms = False, float("nan")
                print(f"   {setting}: {type(exc).__name__}: {str(exc)[:100]}")
            results.append((ms, setting, ok))
        for k, val in current.items():
            setattr(K, k, val)
        results.sort(key=lambda r: r[0])
        base = next(ms for ms, s, _ in results if s == current)
        print(f"-- {name}: current {current} {base * 1e3:.1f} us; ideal {ideal * 1e3:.1f} us")
        for ms, setting, ok in results[:5]:
            print(f"   {ms * 1e3:7.1f} us  {setting}{'' if ok else '  OUTPUTS DIFFER'}")


if __name__ == "__main__":
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for T in [int(a) for a in sys.argv[1:]] or [8192, 16384]:
        sweep(T)
