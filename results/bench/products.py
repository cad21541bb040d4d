"""Each of the six expert products of a SwiGLU MoE layer, as one ``torch._grouped_mm`` and as one cuBLAS
product per expert, interleaved round by round (CUDA events, 20 calls per timing).

    python results/bench/products.py [tokens ...] > results/bench/products.txt

Which product form is faster differs between GPUs and shapes (H100: the grouped kernels; H200: per-expert
cuBLAS at StableLM-1.6B's shape, `results/bench/README.md`); this names the products where it differs.
"""

from __future__ import annotations

import statistics
import sys

import torch

from stgc.bench.moe import _timed_ms

D, F, E, K = 2048, 5632, 4, 2
CALLS, ROUNDS = 20, 15


def products(A: int, dev: torch.device):
    torch.manual_seed(0)
    bf = torch.bfloat16
    x = torch.randn(A, D, device=dev, dtype=bf)
    a = torch.randn(A, F, device=dev, dtype=bf)
    gh = torch.randn(A, 2 * F, device=dev, dtype=bf)
    g2 = torch.randn(A, D, device=dev, dtype=bf)
    w_in = torch.randn(E, 2 * F, D, device=dev, dtype=bf) * 0.02
    w_out = torch.randn(E, D, F, device=dev, dtype=bf) * 0.02
    bounds = [round(e * A / E) for e in range(E + 1)]
    offs = torch.tensor(bounds[1:], device=dev, dtype=torch.int32)
    seg = [(e, bounds[e], bounds[e + 1]) for e in range(E)]

    def per_rows_wt(inp, w):
        out = inp.new_empty(inp.shape[0], w.shape[1])
        return lambda: [torch.mm(inp[s:t], w[e].t(), out=out[s:t]) for e, s, t in seg]

    def per_rows_w(g, w):
        out = g.new_empty(g.shape[0], w.shape[2])
        return lambda: [torch.mm(g[s:t], w[e], out=out[s:t]) for e, s, t in seg]

    def per_wgrad(g, inp):
        out = g.new_empty(E, g.shape[1], inp.shape[1])
        return lambda: [torch.mm(g[s:t].t(), inp[s:t], out=out[e]) for e, s, t in seg]

    return {
        "fwd h = x W_in^T": (
            lambda: torch._grouped_mm(x, w_in.transpose(1, 2), offs=offs),
            per_rows_wt(x, w_in),
        ),
        "fwd o = a W_out^T": (
            lambda: torch._grouped_mm(a, w_out.transpose(1, 2), offs=offs),
            per_rows_wt(a, w_out),
        ),
        "bwd dA = g2 W_out": (lambda: torch._grouped_mm(g2, w_out, offs=offs), per_rows_w(g2, w_out)),
        "bwd dW_out = g2^T a": (lambda: torch._grouped_mm(g2.t(), a, offs=offs), per_wgrad(g2, a)),
        "bwd dW_in = gh^T x": (lambda: torch._grouped_mm(gh.t(), x, offs=offs), per_wgrad(gh, x)),
        "bwd dX = gh W_in": (lambda: torch._grouped_mm(gh, w_in, offs=offs), per_rows_w(gh, w_in)),
    }


def main(tokens: list[int]) -> None:
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}; D={D} F={F} E={E} top-{K}, bf16")
    print(f"# median of {ROUNDS} interleaved rounds of {CALLS} calls; ms per call")
    for T in tokens:
        A = T * K
        table = products(A, dev)
        for g, p in table.values():
            g(), p()
        torch.cuda.synchronize()
        times = {name: ([], []) for name in table}
        for _ in range(ROUNDS):
            for name, (g, p) in table.items():
                times[name][0].append(_timed_ms(g, dev, CALLS))
                times[name][1].append(_timed_ms(p, dev, CALLS))
        print(f"== {T} tokens ({A} rows)")
        print(f"  {'product':22s} {'grouped':>9s} {'per-expert':>11s} {'grouped/per':>12s}")
        tg = tp = 0.0
        for name, (gs, ps) in times.items():
            mg, mp = statistics.median(gs), statistics.median(ps)
            ratio = statistics.median(a / b for a, b in zip(gs, ps, strict=True))
            tg, tp = tg + mg, tp + mp
            print(f"  {name:22s} {mg:9.3f} {mp:11.3f} {ratio:12.3f}")
        print(f"  {'sum':22s} {tg:9.3f} {tp:11.3f} {tg / tp:12.3f}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [8192, 16384])
