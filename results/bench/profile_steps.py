"""Kernel time vs wall time of the MoE block, the matrix-product floor and the STGC layer stack (one GPU).

From the repository root on a CUDA machine:
``python results/bench/profile_steps.py > results/bench/profile_steps.txt``.
For each step: the median wall time (CUDA events), then one step under ``torch.profiler``: the number and
summed time of its kernels, the span from the first to the last kernel, and the GPU idle time between
kernels (gaps over 3 us; the profiler itself slows the host, so spans and gaps are inflated); then the
kernels by summed time. Last, the kernels the fused STGC mode adds to the baseline on the layer stack.
"""

from __future__ import annotations

import collections
import statistics

import torch

from stgc.bench.deepspeed_ref import single_process_group
from stgc.bench.moe import BenchConfig, _steps
from stgc.bench.stgc import StackShape, _layer_steps


def wall_ms(step, n: int = 20) -> float:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def profile(name: str, step, top: int = 15) -> collections.Counter:
    wall = wall_ms(step)
    acts = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        step()
        torch.cuda.synchronize()
    ev = sorted(
        (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda e: e.time_range.start,
    )
    total = sum(e.time_range.end - e.time_range.start for e in ev)
    span = ev[-1].time_range.end - ev[0].time_range.start
    gaps = [b.time_range.start - a.time_range.end for a, b in zip(ev, ev[1:])]
    idle = sum(g for g in gaps if g > 3)
    by_name: collections.Counter = collections.Counter()
    for e in ev:
        by_name[e.name[:80]] += e.time_range.end - e.time_range.start
    print(
        f"== {name}: wall {wall:.3f} ms | {len(ev)} kernels, sum {total / 1e3:.3f} ms | "
        f"span {span / 1e3:.3f} ms | idle between kernels {idle / 1e3:.3f} ms"
    )
    for k, v in by_name.most_common(top):
        print(f"   {v / 1e3:7.3f} ms  {k}")
    return by_name


def main() -> None:
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    with single_process_group():
        steps = _steps(BenchConfig(tokens=(8192,)), 8192, dev)
        for impl in ("stgc", "floor"):
            profile(f"MoE block bench, {impl}, 8192 tokens", steps[impl])
        del steps
    layer_steps, shape = _layer_steps(StackShape(), dev, torch.bfloat16)
    base = profile(f"layer stack ({shape}), baseline", layer_steps["baseline"])
    fused = profile(f"layer stack ({shape}), fused", layer_steps["fused"])
    profile(f"layer stack ({shape}), two_pass", layer_steps["two_pass"])
    print("== kernels the fused mode adds (fused - baseline, summed over the step)")
    for k in sorted(fused, key=lambda k: -(fused[k] - base.get(k, 0)))[:10]:
        print(f"   {(fused[k] - base.get(k, 0)) / 1e3:7.3f} ms  {k}")


if __name__ == "__main__":
    main()
