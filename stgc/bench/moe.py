"""`stgc bench moe`: forward+backward time and peak memory of the MoE block against DeepSpeed's MoE layer.

Implementations (same router and expert weights, same tokens, same upstream gradient; the aux loss is in
the backward of each, with MoE-LLaVA's coefficient 0.01):
- ``stgc``: ``stgc.moe.MoEBlock`` with the project's defaults (no capacity, deterministic top-2)
- ``stgc_moellava_settings``: the block with MoE-LLaVA's routing (capacity 1.5, Gumbel 2nd expert)
- ``stgc_grouped``: the block with every expert product as one ``torch._grouped_mm``
  (``expert_products="grouped"``; the default ``auto`` runs the backward's products per expert on sizes
  copied to the host during the forward, ``stgc.moe.EXPERT_PRODUCTS``)
- ``stgc_per_expert``: the block with one product per expert sized on the host
  (``expert_products="per_expert"``: its CPU path, one device sync per forward) instead of
  ``torch._grouped_mm``
- ``deepspeed_moellava``: ``deepspeed.moe.layer.MoE`` as MoE-LLaVA configures it (``MOELLAVA_DS_SETTINGS``)
- ``deepspeed_nodrop``: the same without token dropping (drop_tokens=False)
- ``stgc_no_triton``: the fused path without its Triton kernels (``use_triton=False``: the eager router
  and sort, the compiled elementwise helpers); ``stgc_eager`` in CSVs before the objectives refactor
- ``stgc_eager``: the block's eager parts (``MoEConfig.implementation="eager"``: the readable router and
  bank, one expert at a time with host syncs), the specification the fused path is tested against
- ``floor``: the experts' matrix products alone on tokens pre-sorted and split evenly over the experts:
  per expert the forward [n, D] x [D, 2F] and [n, F] x [F, D] products and the four backward products
  (dA, dW_out, dW_in, dX), one SwiGLU pass each way (compiled on CUDA); no autograd, routing or combine
- ``floor_grouped``: the same six products as one ``torch._grouped_mm`` each (device offsets), as
  ``stgc_grouped`` issues them

Default shape: StableLM-2-1.6B's FFN (D 2048, F 5632), E 4, top-2, bf16 experts with an fp32 router, T in
{8192, 16384} tokens. ``--quick`` uses tiny shapes so that the CPU smoke test runs in seconds. The
implementations are timed round by round, one step of each per round in a rotating order
(``measure_interleaved``), each step synchronised (the GPU starts idle: the host's time to issue the first
kernels is in the figure; CUDA events on a GPU); times are medians over rounds and every ratio is the median
of the per-round ratios (``paired_ratio``; ``ratio_to_floor_p25`` / ``_p75``: their quartiles), so that the
machine's drift during a run (clocks, neighbours) cancels. ``pipelined_ms`` is the time per step of 10
steps issued back to back (the host runs ahead, as in training), interleaved the same way. Peak memory is
torch.cuda.max_memory_allocated during one step minus the memory allocated before it, with the gradients
of the step before released first (``peak_mib``; NaN on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from stgc.bench.deepspeed_ref import MOELLAVA_DS_SETTINGS, deepspeed_moe_from_block, single_process_group
from stgc.config import MoEConfig
from stgc.moe import MoEBlock, RoutingContext, routing_context
from stgc.moe.dispatch import ExpertGroups, use_grouped_mm
from stgc.provenance import git_revision

IMPLS = (
    "stgc",
    "stgc_grouped",
    "stgc_no_triton",
    "stgc_eager",
    "stgc_moellava_settings",
    "stgc_per_expert",
    "deepspeed_moellava",
    "deepspeed_nodrop",
    "floor",
    "floor_grouped",
)
BASELINE_IMPL, FLOOR_IMPL, GROUPED_FLOOR_IMPL = "deepspeed_moellava", "floor", "floor_grouped"
PIPELINED_STEPS = 10
AUX_COEF = 0.01  # MoE-LLaVA's router_aux_loss_coef
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# the figures printed as the table (``format_table``), then the CSV's stamp of each run
FIGURES = (
    "impl",
    "tokens",
    "fwd_bwd_ms",
    "peak_mem_mib",
    "speedup_vs_deepspeed_moellava",
    "ratio_to_floor",
    "ratio_to_floor_p25",
    "ratio_to_floor_p75",
    "ratio_to_floor_grouped",
    "pipelined_ms",
    "pipelined_ratio_to_floor",
)
COLUMNS = (
    FIGURES[:2]
    + ("dtype",)
    + FIGURES[2:]
    + (
        "device",
        "torch_version",
        "git_revision",
        "date",
        "hidden_size",
        "ffn_size",
        "num_experts",
        "top_k",
        "repeats",
    )
)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. hidden/ffn/experts/top_k: the MoE layer; warmup/repeats per measurement."""

    tokens: tuple[int, ...] = (8192, 16384)
    dtype: str = "bf16"
    hidden_size: int = 2048
    ffn_size: int = 5632
    num_experts: int = 4
    top_k: int = 2
    warmup: int = 3
    repeats: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; use one of {sorted(DTYPES)}.")
        if not self.tokens or min(self.tokens) < self.num_experts:
            raise ValueError(f"tokens={self.tokens} is invalid; give token counts >= num_experts.")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"repeats={self.repeats} / warmup={self.warmup}: use repeats >= 1, warmup >= 0.")

    @classmethod
    def quick(cls, dtype: str = "bf16") -> BenchConfig:
        """Tiny shapes for a CPU smoke test (seconds)."""
        return cls(tokens=(256, 512), dtype=dtype, hidden_size=64, ffn_size=128, warmup=1, repeats=3)


# --------------------------------------------------------------------------------------------------------
# measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_ms(step: Callable[[], None], device: torch.device, steps: int = 1) -> float:
    """ms per step of ``steps`` calls of ``step`` issued back to back, synchronised once at the end (CUDA
    events on a GPU, the wall clock elsewhere)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) * 1e3 / steps


def peak_mib(step: Callable[[], None], device: torch.device) -> float:
    """Peak MiB allocated during one ``step`` above what was allocated before it (NaN off CUDA). A step
    with a ``prepare`` attribute has it called first (the benchmarks' blocks: their gradients of the step
    before are released, so that the new ones count, as the floor's freshly written ones do)."""
    prepare = getattr(step, "prepare", None)
    if prepare is not None:
        prepare()
    if device.type != "cuda":
        step()
        return float("nan")
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """(median ms of ``step`` timed one step at a time, peak MiB above the pre-step allocation; NaN off
    CUDA)."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = [_timed_ms(step, device) for _ in range(repeats)]
    return statistics.median(times), peak_mib(step, device)


def measure_interleaved(
    steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int, calls: int = 1
) -> dict[str, list[float]]:
    """ms per step of each of ``steps`` in each of ``repeats`` rounds. Every round times every step once
    (``calls`` steps issued back to back, one synchronisation), in an order that rotates from round to round:
    a slow minute of the machine (clocks, a neighbour) hits every step alike and no step always follows
    the heaviest, so per-round ratios (``paired_ratio``) compare like with like."""
    names = list(steps)
    for _ in range(warmup):
        for step in steps.values():
            step()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_timed_ms(steps[name], device, calls))
    return times


def paired_ratio(times: list[float], base: list[float]) -> tuple[float, float, float]:
    """Median, 25th and 75th percentile over rounds of times / base, both measured in the same round."""
    ratios = sorted(t / b for t, b in zip(times, base, strict=True))
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), q[0], q[2]


def _clear_grads(*tensors: Tensor) -> None:
    for t in tensors:
        t.grad = None


def _steps(cfg: BenchConfig, T: int, device: torch.device) -> dict[str, Callable[[], None]]:
    """One forward+backward closure per implementation, all on the same weights, tokens and gradient."""
    dtype = DTYPES[cfg.dtype]
    D, F_, E = cfg.hidden_size, cfg.ffn_size, cfg.num_experts
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    x = torch.randn(T, D, generator=g).to(device, dtype)
    dy = torch.randn(T, D, generator=g).to(device, dtype)
    coef = torch.tensor(AUX_COEF, device=device)

    torch.manual_seed(cfg.seed)
    base_cfg = MoEConfig(num_experts=E, top_k=cfg.top_k)
    block = MoEBlock(base_cfg, D, F_, "swiglu", layer_idx=0).to(device, dtype).train()
    block.router.float()
    moellava_cfg = base_cfg.replace(
        capacity_factor=1.5, min_capacity=0, second_expert_sampling=cfg.top_k == 2
    )
    block_ml = MoEBlock(moellava_cfg, D, F_, "swiglu", layer_idx=0).to(device, dtype).train()
    block_ml.load_state_dict(block.state_dict())
    block_pe = MoEBlock(base_cfg, D, F_, "swiglu", layer_idx=0).to(device, dtype).train()
    block_pe.load_state_dict(block.state_dict())
    block_pe.router.float()
    block_pe.expert_products = "per_expert"
    block_gr = MoEBlock(base_cfg, D, F_, "swiglu", layer_idx=0).to(device, dtype).train()
    block_gr.load_state_dict(block.state_dict())
    block_gr.router.float()
    block_gr.expert_products = "grouped"
    block_nt = MoEBlock(base_cfg, D, F_, "swiglu", layer_idx=0).to(device, dtype).train()
    block_nt.load_state_dict(block.state_dict())
    block_nt.router.float()
    block_nt.use_triton = False
    eager_cfg = base_cfg.replace(implementation="eager")
    block_eager = MoEBlock(eager_cfg, D, F_, "swiglu", layer_idx=0).to(device, dtype).train()
    block_eager.load_state_dict(block.state_dict())
    block_eager.router.float()

    def ours(b: MoEBlock) -> Callable[[], None]:
        xi = x.detach().requires_grad_()
        params = list(b.parameters())

        def step() -> None:
            _clear_grads(xi, *params)
            ctx = RoutingContext(records=[])
            with routing_context(b, ctx):
                y = b(xi)
            torch.autograd.backward([y, ctx.records[0].aux_loss], [dy, coef])

        step.prepare = lambda: _clear_grads(xi, *params)
        return step

    def deepspeed(**settings) -> Callable[[], None]:
        layer = deepspeed_moe_from_block(block, **settings).train()
        xi = x.detach().requires_grad_()
        params = list(layer.parameters())

        def step() -> None:
            _clear_grads(xi, *params)
            y, l_aux, _ = layer(xi)
            torch.autograd.backward([y, l_aux], [dy, coef])

        step.prepare = lambda: _clear_grads(xi, *params)
        return step

    def floor() -> Callable[[], None]:
        # No autograd, no routing, no gather / scatter / combine: per expert the six products of a SwiGLU
        # FFN's forward + backward on an even share of the T*K assignments, written into fresh buffers,
        # plus one activation pass each way (fused by torch.compile on CUDA, as the block's own).
        w_in, w_out = block.experts.w_in.detach(), block.experts.w_out.detach()
        A = T * cfg.top_k
        xs, dys = x.repeat(cfg.top_k, 1)[:A].contiguous(), dy.repeat(cfg.top_k, 1)[:A].contiguous()
        bounds = [round(e * A / E) for e in range(E + 1)]
        act_fwd, act_bwd = _compiled(_swiglu_fwd, device), _compiled(_swiglu_bwd, device)

        def step() -> None:
            h = xs.new_empty(A, 2 * F_)
            o, gx = xs.new_empty(A, D), xs.new_empty(A, D)
            ga = xs.new_empty(A, F_)
            g_win, g_wout = torch.empty_like(w_in), torch.empty_like(w_out)
            for e in range(E):
                s, t = bounds[e], bounds[e + 1]
                torch.mm(xs[s:t], w_in[e].t(), out=h[s:t])
            a = act_fwd(h)
            for e in range(E):
                s, t = bounds[e], bounds[e + 1]
                torch.mm(a[s:t], w_out[e].t(), out=o[s:t])
                torch.mm(dys[s:t], w_out[e], out=ga[s:t])
                torch.mm(dys[s:t].t(), a[s:t], out=g_wout[e])
            gh = act_bwd(h, ga)
            for e in range(E):
                s, t = bounds[e], bounds[e + 1]
                torch.mm(gh[s:t].t(), xs[s:t], out=g_win[e])
                torch.mm(gh[s:t], w_in[e], out=gx[s:t])

        return step

    def floor_grouped() -> Callable[[], None]:
        # the six products through the block's own product helper (torch._grouped_mm with device offsets
        # where the block uses it), on the same even split; the same compiled activation passes
        w_in, w_out = block.experts.w_in.detach(), block.experts.w_out.detach()
        A = T * cfg.top_k
        xs, dys = x.repeat(cfg.top_k, 1)[:A].contiguous(), dy.repeat(cfg.top_k, 1)[:A].contiguous()
        ends = torch.tensor([round((e + 1) * A / E) for e in range(E)], device=device)
        dims = (D, w_in.shape[1], F_)
        groups = ExpertGroups.for_rows(A, ends, E, "grouped", use_grouped_mm(xs, dims, "grouped"))
        act_fwd, act_bwd = _compiled(_swiglu_fwd, device), _compiled(_swiglu_bwd, device)

        def step() -> None:
            h = groups.rows_wt(xs, w_in)
            a = act_fwd(h)
            groups.rows_wt(a, w_out)
            ga = groups.rows_w(dys, w_out)
            groups.weight_grad(dys, a)
            gh = act_bwd(h, ga)
            groups.weight_grad(gh, xs)
            groups.rows_w(gh, w_in)

        return step

    nodrop = {**MOELLAVA_DS_SETTINGS, "drop_tokens": False}
    return {
        "stgc": ours(block),
        "stgc_grouped": ours(block_gr),
        "stgc_no_triton": ours(block_nt),
        "stgc_eager": ours(block_eager),
        "stgc_moellava_settings": ours(block_ml),
        "stgc_per_expert": ours(block_pe),
        "deepspeed_moellava": deepspeed(**MOELLAVA_DS_SETTINGS),
        "deepspeed_nodrop": deepspeed(**nodrop),
        "floor": floor(),
        "floor_grouped": floor_grouped(),
    }


def _swiglu_fwd(h: Tensor) -> Tensor:
    F_ = h.shape[1] // 2
    return F.silu(h[:, :F_]) * h[:, F_:]


def _swiglu_bwd(h: Tensor, ga: Tensor) -> Tensor:
    F_ = h.shape[1] // 2
    gate, up, g = h[:, :F_].float(), h[:, F_:].float(), ga.float()
    sig = torch.sigmoid(gate)
    return torch.cat([g * up * sig * (1 + gate * (1 - sig)), g * gate * sig], dim=1).to(h.dtype)


def _compiled(fn: Callable, device: torch.device) -> Callable:
    return torch.compile(fn) if device.type == "cuda" else fn


def run_benchmark(cfg: BenchConfig, device: torch.device | None = None) -> list[dict]:
    """Measure every implementation at every token count; one row per (impl, tokens)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    stamp = dict(
        dtype=cfg.dtype,
        device=device_name,
        torch_version=torch.__version__,
        git_revision=git_revision(),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        hidden_size=cfg.hidden_size,
        ffn_size=cfg.ffn_size,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        repeats=cfg.repeats,
    )
    rows = []
    with single_process_group():
        for T in cfg.tokens:
            steps = _steps(cfg, T, device)
            synced = measure_interleaved(steps, device, cfg.warmup, cfg.repeats)
            piped = measure_interleaved(steps, device, 0, max(3, cfg.repeats // 3), PIPELINED_STEPS)
            peaks = {impl: peak_mib(step, device) for impl, step in steps.items()}
            del steps
            if device.type == "cuda":
                torch.cuda.empty_cache()
            for impl in synced:
                speedup = paired_ratio(synced[BASELINE_IMPL], synced[impl])[0]
                to_floor = paired_ratio(synced[impl], synced[FLOOR_IMPL])
                to_grouped = paired_ratio(synced[impl], synced[GROUPED_FLOOR_IMPL])[0]
                rows.append(
                    dict(
                        impl=impl,
                        tokens=T,
                        fwd_bwd_ms=round(statistics.median(synced[impl]), 4),
                        peak_mem_mib=round(peaks[impl], 1),
                        speedup_vs_deepspeed_moellava=round(speedup, 3),
                        ratio_to_floor=round(to_floor[0], 3),
                        ratio_to_floor_p25=round(to_floor[1], 3),
                        ratio_to_floor_p75=round(to_floor[2], 3),
                        ratio_to_floor_grouped=round(to_grouped, 3),
                        pipelined_ms=round(statistics.median(piped[impl]), 4),
                        pipelined_ratio_to_floor=round(paired_ratio(piped[impl], piped[FLOOR_IMPL])[0], 3),
                        **stamp,
                    )
                )
    return rows


def write_csv(rows: list[dict], path: Path, columns: tuple[str, ...] = COLUMNS) -> None:
    """Write ``rows`` (dicts with at least ``columns``) to ``path`` (folders created); every benchmark's
    CSV goes through here."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: r[k] for k in columns} for r in rows)


def format_table(rows: list[dict]) -> str:
    cols = FIGURES
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=None, help="token counts (default 8192 16384)"
    )
    parser.add_argument("--out", type=Path, default=Path("results/bench/moe.csv"), help="CSV to write")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="bf16", help="expert weights / activations"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a CPU smoke test")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")


def run(args: argparse.Namespace) -> int:
    cfg = BenchConfig.quick(args.dtype) if args.quick else BenchConfig(dtype=args.dtype)
    changes = {}
    if args.tokens:
        changes["tokens"] = tuple(args.tokens)
    if args.repeats:
        changes["repeats"] = args.repeats
    cfg = dataclasses.replace(cfg, **changes)
    rows = run_benchmark(cfg, torch.device(args.device) if args.device else None)
    write_csv(rows, args.out)
    print(format_table(rows))
    print(f"wrote {args.out}")
    return 0
