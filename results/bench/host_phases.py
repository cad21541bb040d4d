"""Host time of the MoE block's forward up to its first expert product, by phase, at several token counts
(each step starts on an idle GPU, as in `stgc bench moe`; median of 30):

    python results/bench/host_phases.py [tokens ...]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from stgc import moe
from stgc.bench.deepspeed_ref import single_process_group
from stgc.bench.moe import BenchConfig, _steps
from stgc.kernels import route_and_dispatch


def phases(T: int) -> None:
    dev = torch.device("cuda")
    cfg = BenchConfig(tokens=(T,))
    steps = _steps(cfg, T, dev)
    step = steps["stgc"]
    marks: list[tuple[str, float]] = []
    orig_gmm, orig_rd, orig_apply = torch._grouped_mm, moe._RouteFn.apply, moe._ExpertsFn.apply
    import stgc.kernels as K

    orig_kernel = K.route_and_dispatch

    def kern(*a, **k):
        marks.append(("route_and_dispatch start", time.perf_counter()))
        out = orig_kernel(*a, **k)
        marks.append(("route_and_dispatch done", time.perf_counter()))
        return out

    K.route_and_dispatch = kern

    def gmm(*a, **k):
        marks.append(("grouped_mm issued", time.perf_counter()))
        out = orig_gmm(*a, **k)
        marks.append(("grouped_mm returned", time.perf_counter()))
        return out

    def rd(*a, **k):
        marks.append(("route start", time.perf_counter()))
        out = orig_rd(*a, **k)
        marks.append(("route done", time.perf_counter()))
        return out

    def ap(*a, **k):
        marks.append(("experts apply", time.perf_counter()))
        return orig_apply(*a, **k)

    torch._grouped_mm, moe._RouteFn.apply, moe._ExpertsFn.apply = gmm, rd, ap
    rows: dict[str, list[float]] = {}
    try:
        for i in range(40):
            marks.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            t_end = time.perf_counter()
            torch.cuda.synchronize()
            t_sync = time.perf_counter()
            if i < 10:
                continue
            seen = set()
            for name, t in marks:
                if name in seen:
                    continue
                seen.add(name)
                rows.setdefault(name, []).append((t - t0) * 1e3)
            rows.setdefault("step issued", []).append((t_end - t0) * 1e3)
            rows.setdefault("GPU done", []).append((t_sync - t0) * 1e3)
    finally:
        torch._grouped_mm, moe._RouteFn.apply, moe._ExpertsFn.apply = orig_gmm, orig_rd, orig_apply
        K.route_and_dispatch = orig_kernel
    print(f"== {T} tokens: host ms from the step's start (median of 30)")
    for name, ts in sorted(rows.items(), key=lambda kv: statistics.median(kv[1])):
        print(f"   {statistics.median(ts):8.3f}  {name}")
    acts = [torch.profiler.ProfilerActivity.CPU]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        step()
        torch.cuda.synchronize()
    ev = sorted(prof.events(), key=lambda e: e.time_range.start)
    t0 = ev[0].time_range.start
    print("   the step's first host events under the profiler (start us, duration us):")
    for e in ev[:60]:
        dur = e.time_range.end - e.time_range.start
        print(f"   {e.time_range.start - t0:8.1f} {dur:8.1f}  {e.name[:70]}")
    x = torch.randn(T, 2048, device=dev, dtype=torch.bfloat16)
    w = torch.randn(4, 2048, device=dev)
    for gather in (False, True):
        ts = []
        for _ in range(30):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            route_and_dispatch(x, w, None, 2, False, gather)
            ts.append((time.perf_counter() - t0) * 1e3)
        print(f"   {statistics.median(ts):8.3f}  route_and_dispatch alone (gather={gather})")


if __name__ == "__main__":
    with single_process_group():
        for T in [int(a) for a in sys.argv[1:]] or [8192, 16384]:
            phases(T)
