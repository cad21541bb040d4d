"""Kernel time vs wall time of the MoE block, the matrix-product floor and the STGC layer stack (one GPU).

From the repository root on a CUDA machine:
``python -m stgc.bench.profile_steps [tokens ...] > results/bench/profile_steps.txt`` (the MoE block
at each token count, default 8192; the layer stack at 8192).
For each step: the median wall time (CUDA events), the median host time to issue it (the step's Python
and launches, no synchronisation) and to issue its first grouped expert product, then one step under
``torch.profiler``: the number and summed time of its kernels, the span from the first to the last
kernel, and the GPU idle time between kernels (gaps over 3 us; the profiler itself slows the host, so
spans and gaps are inflated); then the kernels by summed time. Then the kernels the fused STGC mode
adds to the baseline on the layer stack; last, the `small` model's training step per mode and the host
time the fused mode adds to it, by function (cProfile).
"""

from __future__ import annotations

import collections
import statistics
import sys
import time

import torch

from stgc.bench.deepspeed_ref import single_process_group
from stgc.bench.moe import BenchConfig, _steps, measure
from stgc.bench.stgc import StackShape, _layer_steps, _small_steps


def host_ms(step, n: int = 20, warmup: int = 0) -> float:
    """Median host time to issue one step (the GPU idle at its start; no synchronisation inside)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def host_to_first_product_ms(step, n: int = 20) -> float:
    """Median host time from the start of a step to the issue of its first grouped expert product (the
    GPU has nothing else to do until then when the step starts on an idle GPU); NaN if it issues none."""
    original, marks = torch._grouped_mm, []

    def marked(*args, **kwargs):
        if len(marks) < len(times):  # the first product of the current step
            marks.append(time.perf_counter())
        return original(*args, **kwargs)

    times: list[float] = []
    torch._grouped_mm = marked
    try:
        for _ in range(n):
            torch.cuda.synchronize()
            times.append(time.perf_counter())
            step()
            if len(marks) < len(times):
                marks.append(float("nan"))
        torch.cuda.synchronize()
    finally:
        torch._grouped_mm = original
    return statistics.median((m - t) * 1e3 for m, t in zip(marks, times))


def profile(name: str, step, top: int = 15) -> collections.Counter:
    wall = measure(step, torch.device("cuda"), warmup=3, repeats=20)[0]
    host = host_ms(step)
    first = host_to_first_product_ms(step)
    acts = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        step()
        torch.cuda.synchronize()
    cpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    launches = sum(e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel")) for e in cpu)
    compiled = [e.cpu_time_total for e in cpu if e.name.startswith("Torch-Compiled Region")]
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
        f"== {name}: wall {wall:.3f} ms | host issues it in {host:.3f} ms "
        f"(first expert product after {first:.3f} ms) | "
        f"{len(ev)} kernels, sum {total / 1e3:.3f} ms | "
        f"span {span / 1e3:.3f} ms | idle between kernels {idle / 1e3:.3f} ms"
    )
    mean_c = statistics.mean(compiled) / 1e3 if compiled else 0.0
    print(
        f"   host side (under the profiler): {launches} kernel launches, "
        f"{len(compiled)} torch.compile calls at {mean_c:.3f} ms each"
    )
    for k, v in by_name.most_common(top):
        print(f"   {v / 1e3:7.3f} ms  {k}")
    return by_name


def launch_costs(n: int = 200) -> None:
    """Host time per call on this machine: an allocation, an eager op, a Triton kernel of this project
    (``stgc.moe.fused.expert_kernels.combine``: one allocation and one launch) and a torch.compile'd
    function, tiny tensors."""
    from stgc.moe.fused.expert_kernels import combine

    a = torch.randn(1024, device="cuda")
    o = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16)
    pos = torch.randint(0, 128, (64, 2), device="cuda")
    w = torch.rand(64, 2, device="cuda")
    compiled = torch.compile(lambda t: t * 2 + 1)
    calls = {
        "torch.empty": lambda: torch.empty(1024, device="cuda"),
        "torch.add (eager op)": lambda: torch.add(a, a),
        "Triton kernel (stgc.moe.fused.expert_kernels.combine)": lambda: combine(o, pos, w),
        "torch.compile'd function": lambda: compiled(a),
    }
    print("== host time per call (tiny tensors; median of 5 runs of", n, "calls)")
    for name, fn in calls.items():
        for _ in range(5):
            fn()
        runs = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            runs.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
        print(f"   {statistics.median(runs):8.1f} us  {name}")


def host_hotspots(name: str, step, n: int = 50, top: int = 22) -> None:
    """Where the host's time to issue ``step`` goes: cProfile over ``n`` steps, functions by own time."""
    stats = _host_profile(step, n)
    print(f"== host hot spots, {name} (cProfile, {n} steps; own time per step)")
    for (file, line, func), (ncalls, tottime, cumtime) in sorted(stats.items(), key=lambda kv: -kv[1][1])[
        :top
    ]:
        where = f"{file.rsplit('/', 2)[-2:][-1]}:{line}"
        print(f"   {tottime * 1e3:7.3f} ms own {cumtime * 1e3:7.3f} ms cum {ncalls:4.0f}x  {func} ({where})")


def _host_profile(step, n: int) -> dict:
    """cProfile over ``n`` calls of ``step``: {(file, line, function): (calls, own s, cumulative s)} per
    call."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(n):
        step()
    prof.disable()
    torch.cuda.synchronize()
    return {k: (v[1] / n, v[2] / n, v[3] / n) for k, v in pstats.Stats(prof).stats.items()}


def host_diff(name: str, base_step, step, n: int = 20, top: int = 15) -> None:
    """The functions whose own host time per step grows most from ``base_step`` to ``step`` (cProfile)."""
    base, new = _host_profile(base_step, n), _host_profile(step, n)
    total = sum(v[1] for v in new.values()) - sum(v[1] for v in base.values())
    print(f"== host time {name} adds (cProfile, {n} steps; own time per step): {total * 1e3:.3f} ms in all")
    grow = sorted(new, key=lambda k: -(new[k][1] - base.get(k, (0, 0, 0))[1]))[:top]
    for file, line, func in grow:
        calls, own, _ = new[(file, line, func)]
        calls0, own0, _ = base.get((file, line, func), (0, 0, 0))
        print(
            f"   {(own - own0) * 1e3:+7.3f} ms {calls - calls0:+5.0f} calls  {func} "
            f"({file.rsplit('/', 1)[-1]}:{line})"
        )


def main() -> None:
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    tokens = [int(t) for t in sys.argv[1:]] or [8192]
    launch_costs()
    with single_process_group():
        for T in tokens:
            steps = _steps(BenchConfig(tokens=(T,)), T, dev)
            for impl in ("stgc", "stgc_no_triton", "floor", "floor_grouped"):
                profile(f"MoE block bench, {impl}, {T} tokens", steps[impl])
            if T == tokens[0]:
                host_hotspots(f"MoE block bench, stgc, {T} tokens", steps["stgc"])
            del steps
    layer_steps, shape = _layer_steps(StackShape(), dev, torch.bfloat16)
    base = profile(f"layer stack ({shape}), baseline", layer_steps["baseline"])
    fused = profile(f"layer stack ({shape}), fused", layer_steps["fused"])
    profile(f"layer stack ({shape}), two_pass", layer_steps["two_pass"])
    print("== kernels the fused mode adds (fused - baseline, summed over the step)")
    for k in sorted(fused, key=lambda k: -(fused[k] - base.get(k, 0)))[:10]:
        print(f"   {(fused[k] - base.get(k, 0)) / 1e3:7.3f} ms  {k}")
    del layer_steps
    small, shape, _ = _small_steps(8, 1024, dev, torch.bfloat16)
    for mode in ("baseline", "fused", "two_pass"):
        profile(f"small model ({shape}), {mode}", small[mode], top=8)
    host_diff("the fused mode (small model)", small["baseline"], small["fused"])


if __name__ == "__main__":
    main()
