"""The expert-product floors of `stgc bench moe` timed one synchronised step at a time and 10 steps back to
back, with the GPU's SM clock and power sampled by nvidia-smi meanwhile; and the grouped GEMM kernels'
own durations in each regime (torch.profiler):

    python results/bench/clocks.py [tokens]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time

import torch

from stgc.bench.deepspeed_ref import single_process_group
from stgc.bench.moe import BenchConfig, _steps, _timed_ms


def sample(stop: threading.Event, out: list) -> None:
    while not stop.is_set():
        q = "--query-gpu=clocks.sm,power.draw,temperature.gpu"
        r = subprocess.run(["nvidia-smi", q, "--format=csv,noheader,nounits"], capture_output=True, text=True)
        try:
            out.append(tuple(float(v) for v in r.stdout.strip().split(",")))
        except ValueError:
            pass
        time.sleep(0.05)


def gemm_us(step, calls: int) -> float:
    acts = [torch.profiler.ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    g = [e.time_range.end - e.time_range.start for e in ev if "gemm" in e.name.lower() or "nvjet" in e.name]
    return sum(g) / calls / 1e3


def main(T: int) -> None:
    dev = torch.device("cuda")
    with single_process_group():
        steps = _steps(BenchConfig(tokens=(T,)), T, dev)
        for name in ("floor", "floor_grouped", "stgc", "stgc_per_expert"):
            step = steps[name]
            for _ in range(5):
                step()
            for calls in (1, 10):
                samples: list = []
                stop = threading.Event()
                th = threading.Thread(target=sample, args=(stop, samples))
                th.start()
                t_end = time.time() + 3.0
                times = []
                while time.time() < t_end:
                    times.append(_timed_ms(step, dev, calls))
                stop.set()
                th.join()
                clk = statistics.median(s[0] for s in samples) if samples else float("nan")
                pw = statistics.median(s[1] for s in samples) if samples else float("nan")
                mode, gemm = "synced" if calls == 1 else "pipelined", gemm_us(step, calls)
                print(
                    f"{T} {name:16s} {mode:9s} {statistics.median(times):7.3f} ms/step | "
                    f"GEMM kernels {gemm:7.3f} ms/step "
                    f"| SM clock {clk:6.0f} MHz, power {pw:5.0f} W ({len(samples)} samples)",
                    flush=True,
                )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8192)
