"""Host time of the pieces of the MoE block's forward on this machine (each call made on an idle GPU after a
synchronisation; median of 50 calls; microseconds), from a bare allocation up to the whole training step:

    python results/bench/host_costs.py [tokens] > results/bench/host_costs.txt

The block's step starts on an idle GPU in `stgc bench moe`, so every microsecond the host spends before the
first expert product is a microsecond the step takes longer than the floor.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from profile_steps import host_ms  # (this folder: the script's own directory is on sys.path)

from stgc import kernels as K
from stgc import moe
from stgc.bench.deepspeed_ref import single_process_group
from stgc.bench.moe import BenchConfig, _steps


@triton.jit
def _one_arg(a):
    tl.store(a + tl.program_id(0), 0.0)


@triton.jit
def _ten_args(a0, a1, a2, a3, a4, a5, a6, a7, n0, n1):
    tl.store(a0 + tl.program_id(0), 0.0)


@triton.jit
def _twenty_args(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, n0, n1, C0: tl.constexpr, C1: tl.constexpr,
                 C2: tl.constexpr, C3: tl.constexpr, C4: tl.constexpr, C5: tl.constexpr):  # fmt: skip
    tl.store(a0 + tl.program_id(0), 0.0)


def main(T: int) -> None:
    dev = torch.device("cuda")
    cfg = BenchConfig(tokens=(T,))
    steps = _steps(cfg, T, dev)
    x = torch.randn(T, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
    xg = x.detach().requires_grad_()
    block = moe.MoEBlock(moe.MoEConfig(num_experts=4, top_k=2), cfg.hidden_size, cfg.ffn_size, "swiglu", 0)
    block = block.to(dev, torch.bfloat16).train()
    block.router.float()
    w = block.router.weight
    bufs = [torch.empty(64, device=dev) for _ in range(12)]
    big = torch.empty(4096, device=dev)
    r = K.route_and_dispatch(x, w.detach(), None, 2, False, True)
    offs = r.offsets_E.to(torch.int32)
    w_in = block.experts.w_in.detach()
    calls = {
        "torch.empty (64 floats)": lambda: torch.empty(64, device=dev),
        "slice t[a:b]": lambda: big[10:20],
        "view": lambda: big.view(64, 64),
        "Triton launch, 1 pointer": lambda: _one_arg[(1,)](bufs[0]),
        "Triton launch, 8 pointers + 2 ints": lambda: _ten_args[(1,)](*bufs[:8], 7, 9),
        "Triton launch, 12 pointers + 2 ints + 6 constexprs": lambda: _twenty_args[(1,)](
            *bufs, 7, 9, C0=1, C1=2, C2=3, C3=4, C4=5, C5=6
        ),
        "stgc.kernels.route_and_dispatch": lambda: K.route_and_dispatch(x, w.detach(), None, 2, False, True),
        "_RouteFn.apply (x requires grad)": lambda: moe._RouteFn.apply(xg, w, None, 2, False),
        "MoEBlock._route_triton": lambda: block._route_triton(xg, None, None),
        "torch._grouped_mm (x_A @ W_in^T)": lambda: torch._grouped_mm(r.x_AD, w_in.mT, offs=offs),
        "MoEBlock forward (grad)": lambda: block(xg),
        "bench step stgc (forward + backward)": steps["stgc"],
        "bench step floor": steps["floor"],
        "bench step floor_grouped": steps["floor_grouped"],
    }
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    print(f"# {torch.cuda.get_device_name()}, {versions}; {T} tokens")
    print("== host time per call (idle GPU at each call's start; median of 50), us")
    for name, fn in calls.items():
        print(f"   {host_ms(fn, n=50, warmup=5) * 1e3:8.1f}  {name}")


if __name__ == "__main__":
    with single_process_group():
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 8192)
