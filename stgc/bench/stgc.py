"""`stgc bench stgc`: the cost of STGC over the baseline, per mode (fused, two_pass, reference).

Two suites, measured in one run, each mode side by side with the baseline on the same weights and data:
- ``layers``: a residual stack of StableLM-2-1.6B-shaped MoE layers (D 2048, F 5632, E 4, top-2, bf16
  experts, fp32 router), T tokens, a regression loss on the output; one step = forward + backward.
  Here the baseline step IS the MoE layers' forward+backward, so the fused overhead is "its extra work as a
  share of the MoE layers' forward+backward".
- ``small``: the ``small`` model (``stgc.backbones``, ~100M parameters) in a full training step: forward,
  backward, AdamW step, on a batch of image+text sequences.
Targets (issue: STGC): fused <= 3% slower than the baseline step and <= 5% more peak memory, its extra work
<= 5% of the MoE layers' forward+backward; two_pass <= 40% slower. The time overhead is the median over
rounds of each round's mode / baseline ratio (with its quartiles); ``step_ms`` the median step time. Peak
memory is ``stgc.bench.moe.peak_mib`` of one step, whose own ``zero_grad`` releases the gradients of the
step before: the new ones replace them and are not counted, alike in every mode (two_pass's kept layer
gradients, held besides, are).
``--quick`` shrinks everything for a CPU smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from stgc.bench.moe import measure_interleaved, paired_ratio, peak_mib, write_csv
from stgc.config import MoEConfig
from stgc.moe import MoEBlock, RoutingContext, routing_context
from stgc.objectives.config import method_preset
from stgc.objectives.set import ObjectiveSet
from stgc.provenance import git_revision

MODES = ("baseline", "fused", "two_pass", "reference")
COLUMNS = (
    "suite",
    "mode",
    "tokens",
    "step_ms",
    "peak_mem_mib",
    "time_overhead_pct",
    "overhead_p25_pct",
    "overhead_p75_pct",
    "mem_overhead_pct",
    "device",
    "torch_version",
    "git_revision",
    "date",
    "shape",
    "repeats",
)


@dataclasses.dataclass(frozen=True)
class StackShape:
    hidden_size: int = 2048
    ffn_size: int = 5632
    num_experts: int = 4
    top_k: int = 2
    num_layers: int = 4
    tokens: int = 8192


@dataclasses.dataclass
class _Out:
    loss: Tensor


class MoEStack(nn.Module):
    """x -> x + MoE_l(x) for each layer -> mean squared error to a fixed target. Takes ``routing_ctx`` like
    the real model so that the objectives' ``step_loss`` drives it unchanged."""

    def __init__(self, s: StackShape):
        super().__init__()
        moe = MoEConfig(num_experts=s.num_experts, top_k=s.top_k)
        self.blocks = nn.ModuleList(
            MoEBlock(moe, s.hidden_size, s.ffn_size, "swiglu", i) for i in range(s.num_layers)
        )

    def forward(self, x: Tensor, target: Tensor, routing_ctx: RoutingContext | None = None) -> _Out:
        with routing_context(self, routing_ctx or RoutingContext()):
            for b in self.blocks:
                x = x + b(x)
        return _Out(loss=(x.float() - target.float()).square().mean())


def _method(mode: str, moe: MoEConfig) -> ObjectiveSet:
    if mode == "baseline":
        return ObjectiveSet(method_preset("baseline"), moe)
    return ObjectiveSet(method_preset("stgc", mode=mode, beta=0.01), moe)


def _layer_steps(s: StackShape, device, dtype) -> tuple[dict[str, Callable[[], None]], str]:
    torch.manual_seed(0)
    model = MoEStack(s).to(device, dtype)
    for b in model.blocks:
        b.router.float()
    x = (0.1 * torch.randn(s.tokens, s.hidden_size, device=device)).to(dtype)
    inputs = {"x": x, "target": torch.randn_like(x)}
    moe = model.blocks[0].config

    def step_for(mode):
        method = _method(mode, moe)

        def step():
            out = method.step_loss(model, inputs, 1)
            out.loss.backward()
            model.zero_grad(set_to_none=True)

        return step

    shape = f"D={s.hidden_size} F={s.ffn_size} E={s.num_experts} K={s.top_k} L={s.num_layers}"
    return {m: step_for(m) for m in MODES}, shape


def _small_steps(
    batch: int, seq: int, device, dtype, size: str = "small"
) -> tuple[dict[str, Callable[[], None]], str, int]:
    from stgc.backbones import num_image_tokens, vision_config
    from stgc.modeling import build_model

    torch.manual_seed(0)
    vocab, image_id, pad_id = 4096, 4095, 0
    model = build_model(
        "stablelm", size, vocab_size=vocab, image_token_id=image_id, pad_token_id=pad_id, moe=MoEConfig()
    ).to(device)
    if dtype != torch.float32:
        model = model.to(dtype)
        for b in model.moe_blocks.values():
            b.router.float()
    model.train()
    vis = vision_config(size)
    n_img = num_image_tokens(vis)
    ids = torch.randint(1, vocab - 1, (batch, seq), device=device)
    ids[:, 1 : 1 + n_img] = image_id
    labels = ids.clone()
    labels[:, : 1 + n_img] = -100
    pixels = torch.randn(batch, 3, vis.image_size, vis.image_size, device=device, dtype=dtype)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels,
        "labels": labels,
    }
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    moe = model.config.moe_config

    def step_for(mode):
        method = _method(mode, moe)

        def step():
            out = method.step_loss(model, inputs, 1)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    n_params = sum(p.numel() for p in model.parameters())
    shape = f"stablelm-{size} {n_params / 1e6:.0f}M params, batch {batch}x{seq} ({n_img} image tokens)"
    return {m: step_for(m) for m in MODES}, shape, batch * seq


def _overhead_pct(times: list[float], base: list[float]) -> tuple[float, float, float]:
    """Median and quartiles over rounds of 100 * (mode / baseline - 1), the two timed in the same round."""
    return tuple(100 * (r - 1) for r in paired_ratio(times, base))


def run_benchmark(
    *,
    stack: StackShape,
    small_batch: int,
    small_seq: int,
    small_size: str,
    modes: tuple[str, ...],
    warmup: int,
    repeats: int,
    device: torch.device,
    dtype: torch.dtype,
) -> list[dict]:
    stamp = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch_version=torch.__version__,
        git_revision=git_revision(),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        repeats=repeats,
    )
    rows = []
    layer_steps, layer_shape = _layer_steps(stack, device, dtype)
    small_steps, small_shape, small_tokens = _small_steps(small_batch, small_seq, device, dtype, small_size)
    for suite, steps, shape, tokens in (
        ("layers", layer_steps, layer_shape, stack.tokens),
        ("small", small_steps, small_shape, small_tokens),
    ):
        times = measure_interleaved({m: steps[m] for m in modes}, device, warmup, repeats)
        peaks = {}
        for mode in modes:
            peaks[mode] = peak_mib(steps[mode], device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        base_mib = peaks["baseline"]
        for mode in modes:
            ms, mib = statistics.median(times[mode]), peaks[mode]
            print(f"  {suite:7s} {mode:10s} {ms:9.3f} ms  {mib:9.1f} MiB", flush=True)
            pct, p25, p75 = _overhead_pct(times[mode], times["baseline"])
            rows.append(
                dict(
                    suite=suite,
                    mode=mode,
                    tokens=tokens,
                    step_ms=round(ms, 3),
                    peak_mem_mib=round(mib, 1),
                    time_overhead_pct=round(pct, 2),
                    overhead_p25_pct=round(p25, 2),
                    overhead_p75_pct=round(p75, 2),
                    mem_overhead_pct=round(100 * (mib / base_mib - 1), 2) if base_mib == base_mib else "",
                    shape=shape,
                    **stamp,
                )
            )
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("results/bench/stgc.csv"), help="CSV to write")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens through the layer stack")
    parser.add_argument("--layers", type=int, default=4, help="MoE layers in the stack")
    parser.add_argument("--small-batch", type=int, default=8, help="sequences per step of the small model")
    parser.add_argument("--small-seq", type=int, default=1024, help="tokens per sequence (incl. image)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (--quick: default 2)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU (smoke test)")


def run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if args.quick:
        stack = StackShape(hidden_size=32, ffn_size=48, num_layers=2, tokens=64)
        kw = dict(
            small_batch=2,
            small_seq=48,
            small_size="tiny",
            warmup=1,
            repeats=args.repeats,
            dtype=torch.float32,
        )
    else:
        stack = StackShape(num_layers=args.layers, tokens=args.tokens)
        kw = dict(
            small_batch=args.small_batch,
            small_seq=args.small_seq,
            small_size="small",
            warmup=args.warmup,
            repeats=args.repeats,
            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        )
    if "baseline" not in args.modes:
        args.modes = ["baseline", *args.modes]
    rows = run_benchmark(stack=stack, modes=tuple(args.modes), device=device, **kw)
    write_csv(rows, args.out, COLUMNS)
    for r in rows:
        print(
            f"{r['suite']:7s} {r['mode']:10s} {r['step_ms']:10.3f} ms  {r['time_overhead_pct']:+7.2f}%  "
            f"{r['peak_mem_mib']:9.1f} MiB  {r['mem_overhead_pct']}%"
        )
    print(f"wrote {args.out}")
    return 0
