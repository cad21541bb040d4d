"""`stgc bench step`: a full training step of the MoE-LLaVA-StableLM-1.6B-shaped model for the baseline,
STGC (fused and two_pass) and every method preset of ``stgc.objectives.config.METHODS``, alone and with
STGC fused on top (methods registered later get their rows without a change here).

The model: ``stgc.backbones``' stablelm ``full`` (StableLM-2-1.6B: D 2048, F 5632, 24 layers, vocab
100352) with CLIP ViT-L/14-336 (576 image tokens), random weights built on the device (nothing is
downloaded), bf16 with fp32 routers, MoE layers as each preset sets them (default: 4 experts, top-2, every
other layer; ``MoEConfig``'s defaults: dropless, ``--capacity-factor 1.5`` for MoE-LLaVA's). One step =
the run's objectives' forward (``ObjectiveSet.step_loss``), backward and an AdamW step on the trained
groups (experts + routers + projector, or what a preset trains), on a batch of 4 x 2048 tokens whose
first 576 after BOS are the image (labels on the text only).

Every method runs on the same weights: one model whose MoE blocks are swapped per method; blocks with the
same expert bank settings share one bank (its parameters and optimizer state), each method has its own
routers; a method whose bank differs gets its own (LLaVA-MoLE's LoRA bank), a method with other MoE layers
its own blocks there. Data-derived inputs are synthetic: a method routing on instruction clusters (MoCLE
style) gets cluster ids 0..B-1, and each method's ``synthetic_setup`` builds what its objectives would
compute from a training set (RoMA's neighbour cache) from the synthetic batch. A method whose objectives run
some layers densely on scheduled steps (CompeteSMoE's competition, ``RoutingContext.dense_layers``) is timed
twice: at a step without dense layers (``<method>``) and at one with the fewest (``<method>@dense``), and
``amortised_ratio`` weighs the two by the schedule's mean number of dense layers per step (drawn for
``StepBench.schedule_steps`` = 1000 steps).

Timing: rounds over all rows in a rotating order (``stgc.bench.moe.measure_interleaved``), each step
synchronised; ``step_ms`` the median over rounds; ``ratio_to_baseline`` the median over rounds of each
round's row / baseline (``paired_ratio``, with quartiles); ``stgc_overhead_pct`` the same for a
``<method>+stgc`` row against ``<method>`` (and stgc / stgc_two_pass against the baseline); peak memory
is ``stgc.bench.moe.peak_mib`` of one step (NaN on a CPU). ``--quick``: the tiny stablelm on the CPU in
fp32, batch 2 x 64 (a smoke test).

    stgc bench step                         # one GPU: results/bench/step.csv (2 min 3 s on an H200, ad78cc8)
    stgc bench step --quick --out /tmp/step.csv
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stgc.bench.moe import DTYPES, measure_interleaved, paired_ratio, peak_mib, write_csv
from stgc.clusters import uses_instruction_clusters
from stgc.config import MoEConfig
from stgc.objectives.config import METHODS
from stgc.objectives.set import ObjectiveSet
from stgc.provenance import git_revision
from stgc.recipes import ModelConfig, RunConfig, TrainingConfig, stgc_variant, with_method

BASELINE = "baseline"
COLUMNS = (
    "row",
    "method",
    "objectives",
    "router",
    "dense_layers",
    "tokens",
    "step_ms",
    "tokens_per_s",
    "peak_mem_mib",
    "ratio_to_baseline",
    "ratio_p25",
    "ratio_p75",
    "stgc_overhead_pct",
    "amortised_ratio",
    "device",
    "torch_version",
    "git_revision",
    "date",
    "shape",
    "repeats",
)


@dataclasses.dataclass(frozen=True)
class StepBench:
    """One run: the model (backbone, size), the batch, and how many rounds."""

    backbone: str = "stablelm"
    size: str = "full"
    batch: int = 4
    seq: int = 2048
    dtype: str = "bf16"
    capacity_factor: float | None = None
    warmup: int = 2
    repeats: int = 10
    schedule_steps: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; use one of {sorted(DTYPES)}.")
        if self.repeats < 1 or self.warmup < 0 or self.batch < 1:
            raise ValueError(
                f"repeats={self.repeats}, warmup={self.warmup}, batch={self.batch}: use >= 1, >= 0, >= 1."
            )

    @classmethod
    def quick(cls) -> StepBench:
        return cls(size="tiny", batch=2, seq=64, dtype="fp32", warmup=1, repeats=2, schedule_steps=200)


def method_configs(bench: StepBench) -> dict[str, RunConfig]:
    """label -> RunConfig of every row: baseline, stgc (fused), stgc_two_pass, then each other preset of
    ``METHODS`` alone and with STGC fused (``<name>+stgc``)."""
    base = RunConfig(
        # a MoE recipe's name: a post-training preset (RoMA) points model.init at that recipe; the bench
        # builds its own random weights and never reads model.init
        name="tiny",
        model=ModelConfig(
            backbone=bench.backbone, size=bench.size, moe=MoEConfig(capacity_factor=bench.capacity_factor)
        ),
        training=TrainingConfig(bf16=bench.dtype == "bf16", trainable="experts,router,projector"),
    )
    rows = {BASELINE: base, "stgc": stgc_variant(base), "stgc_two_pass": stgc_variant(base, mode="two_pass")}
    for name in METHODS:
        if name in (BASELINE, "stgc"):
            continue
        config = with_method(base, name)
        rows[name] = config
        rows[f"{name}+stgc"] = stgc_variant(config)
    return rows


class MethodSwitch:
    """One model whose MoE blocks, MoE config and trained parameters are switched per method (see the
    module docstring). ``install(label)`` is cheap: module assignments, and requires_grad flags only when
    the trained groups change."""

    def __init__(self, model: nn.Module, configs: dict[str, RunConfig], device: torch.device, dtype):
        from stgc.modeling import json_form
        from stgc.trainer import set_trainable

        self.model, self.device, self.dtype = model, device, dtype
        self.layers = model.model.language_model.layers
        self.text_cfg = model.config.text_config
        self.base_moe = model.config.moe_config
        self.dense = {i: layer.mlp for i, layer in enumerate(self.layers) if i not in model.config.moe_layers}
        base_blocks = model.moe_blocks
        self.banks = {(i, self._bank_key(self.base_moe)): b.experts for i, b in base_blocks.items()}
        self.blocks: dict[str, dict[int, nn.Module]] = {}
        self.trainable: dict[str, set[int]] = {}
        self.moe_dicts: dict[str, dict] = {}
        self._installed: str | None = None
        self._flags: frozenset[int] | None = None
        for label, config in configs.items():
            moe = config.model.moe
            if moe == self.base_moe:
                blocks = dict(base_blocks)
            else:
                blocks = {i: self._block(moe, i) for i in moe.resolve_layers(self.text_cfg.num_hidden_layers)}
            self.blocks[label] = blocks
            self.moe_dicts[label] = json_form(moe.to_dict())
            self._assign(label)
            set_trainable(model, config.training.trainable, config.training.trainable_groups())
            self.trainable[label] = {id(p) for p in model.parameters() if p.requires_grad}
        self.all_params = {id(p): p for label in configs for p in self._params_of(label)}

    @staticmethod
    def _bank_key(moe: MoEConfig) -> str:
        return json.dumps([moe.num_experts, moe.experts.to_dict()], sort_keys=True)

    def _block(self, moe: MoEConfig, i: int) -> nn.Module:
        from stgc.moe import MoEBlock
        from stgc.moe.experts import build_experts

        D, F_ = self.text_cfg.hidden_size, self.text_cfg.intermediate_size
        ffn = next(iter(self.banks.values())).ffn
        with torch.device("meta"):
            block = MoEBlock(moe, D, F_, ffn, i)
        key = (i, self._bank_key(moe))
        if key not in self.banks:
            with torch.device(self.device):
                self.banks[key] = build_experts(moe, D, F_, ffn).to(self.dtype)
        block.experts = self.banks[key]
        block.router.to_empty(device=self.device)
        block.router.init_weights(getattr(self.text_cfg, "initializer_range", 0.02))
        block.router.float()
        return block.train()

    def _dense_mlp(self, i: int) -> nn.Module:
        if i not in self.dense:  # a base MoE layer that a method keeps dense: the text model's own MLP
            mlp_cls = type(next(iter(self.dense.values())))
            with torch.device(self.device):
                self.dense[i] = mlp_cls(self.text_cfg).to(self.dtype)
        return self.dense[i]

    def _assign(self, label: str) -> None:
        blocks = self.blocks[label]
        for i, layer in enumerate(self.layers):
            layer.mlp = blocks[i] if i in blocks else self._dense_mlp(i)
        self.model.config.moe = self.moe_dicts[label]

    def _params_of(self, label: str) -> list[nn.Parameter]:
        self._assign(label)
        self._installed = None
        return [p for p in self.model.parameters() if id(p) in self.trainable[label]]

    def install(self, label: str) -> None:
        if self._installed != label:
            self._assign(label)
            self._installed = label
        flags = frozenset(self.trainable[label])
        if flags != self._flags:
            for key, p in self.all_params.items():
                p.requires_grad_(key in flags)
            self._flags = flags

    def moe_layers(self, label: str) -> tuple[int, ...]:
        return tuple(sorted(self.blocks[label]))


def _inputs(bench: StepBench, model: nn.Module, device: torch.device, dtype) -> dict[str, torch.Tensor]:
    from stgc.backbones import num_image_tokens

    cfg = model.config
    vocab, image_id = cfg.text_config.vocab_size, cfg.image_token_id
    n_img = num_image_tokens(cfg.vision_config)
    if bench.seq <= n_img + 2:
        raise ValueError(f"seq={bench.seq} leaves no text after {n_img} image tokens; use seq > {n_img + 2}.")
    g = torch.Generator().manual_seed(bench.seed)
    ids = torch.randint(2, vocab - 2, (bench.batch, bench.seq), generator=g)
    ids[:, 1 : 1 + n_img] = image_id
    labels = ids.clone()
    labels[:, : 1 + n_img] = -100
    size = cfg.vision_config.image_size
    pixels = torch.randn(bench.batch, 3, size, size, generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pixels.to(device, dtype),
        "labels": labels.to(device),
    }


def build_bench_model(bench: StepBench, device: torch.device) -> nn.Module:
    """The randomly initialised model, built on ``device`` in the bench's dtype (routers fp32)."""
    from stgc.backbones import BACKBONES
    from stgc.modeling import build_model

    sizes = BACKBONES[bench.backbone].sizes
    if bench.size not in sizes:
        raise ValueError(f"size={bench.size!r} is not defined for {bench.backbone}; valid: {sorted(sizes)}.")
    vocab = sizes[bench.size].get("vocab_size", 4096)
    torch.manual_seed(bench.seed)
    with torch.device(device):
        model = build_model(
            bench.backbone,
            bench.size,
            vocab_size=vocab,
            image_token_id=vocab - 1,
            pad_token_id=0,
            moe=MoEConfig(capacity_factor=bench.capacity_factor),
            dtype=DTYPES[bench.dtype],
        )
    return model.train()


def _step_index(objectives: ObjectiveSet, steps: int) -> tuple[int, int | None, float]:
    """(a step without dense layers, the step with the fewest dense layers or None, the mean number of
    dense layers per step) of a method's schedule."""
    counts = [len(objectives.routing_context(s, None).dense_layers or ()) for s in range(steps)]
    plain = max((s for s, n in enumerate(counts) if n == 0), default=0)
    dense = [n for n in counts if n > 0]
    if not dense:
        return plain, None, 0.0
    fewest = min(dense)
    return plain, counts.index(fewest), sum(counts) / len(counts)


def run_benchmark(bench: StepBench, device: torch.device, say: Callable[[str], None] = print) -> list[dict]:
    dtype = DTYPES[bench.dtype]
    configs = method_configs(bench)
    model = build_bench_model(bench, device)
    switch = MethodSwitch(model, configs, device, dtype)
    inputs = _inputs(bench, model, device, dtype)
    params = list(switch.all_params.values())
    opt = torch.optim.AdamW(params, lr=1e-5)
    steps: dict[str, Callable[[], None]] = {}
    info: dict[str, dict[str, Any]] = {}
    for label, config in configs.items():
        moe = config.model.moe
        objectives = ObjectiveSet(config.method, moe)
        layers = switch.moe_layers(label)
        objectives.check(layers)
        objectives.prepare(max_steps=bench.schedule_steps, moe_layers=layers, seed=bench.seed)
        batch = dict(inputs)
        if uses_instruction_clusters(moe):  # synthetic: one cluster per sample
            batch["cluster_ids"] = torch.arange(bench.batch, device=device) % moe.router.num_clusters
        switch.install(label)
        objectives.synthetic_setup(model, batch)  # stand-ins for what a training set would give (RoMA's)
        plain, dense, mean_dense = _step_index(objectives, bench.schedule_steps)
        variants = [(label, plain)] + ([(f"{label}@dense", dense)] if dense is not None else [])
        for row, index in variants:
            steps[row] = _make_step(switch, label, objectives, batch, index, opt)
            info[row] = dict(
                method=label,
                objectives="+".join(objectives.names),
                router=moe.router.name,
                dense_layers=len(objectives.routing_context(index, None).dense_layers or ()),
                mean_dense=mean_dense,
            )
    say(f"stgc bench step: {len(steps)} rows, {bench.repeats} rounds")
    times = measure_interleaved(steps, device, bench.warmup, bench.repeats)
    peaks = {}
    for row, step in steps.items():
        peaks[row] = peak_mib(step, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    tokens = bench.batch * bench.seq
    n_params = sum(p.numel() for p in model.parameters())
    stamp = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch_version=torch.__version__,
        git_revision=git_revision(),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        shape=f"{bench.backbone}-{bench.size} {n_params / 1e9:.2f}B params (baseline), "
        f"{bench.batch}x{bench.seq} tokens, {bench.dtype}, capacity {bench.capacity_factor}",
        repeats=bench.repeats,
    )
    rows = []
    base = times[BASELINE]
    for row, t in times.items():
        meta = info[row]
        ratio, p25, p75 = paired_ratio(t, base)
        ms = statistics.median(t)
        over = ""
        ref = _stgc_reference(row)
        if ref is not None and ref in times:
            over = round(100 * (paired_ratio(t, times[ref])[0] - 1), 2)
        amortised = ""
        if meta["mean_dense"] and not row.endswith("@dense"):
            dense_row = f"{row}@dense"
            n1 = info[dense_row]["dense_layers"]
            t0, t1 = statistics.median(t), statistics.median(times[dense_row])
            amortised = round((t0 + meta["mean_dense"] / n1 * (t1 - t0)) / statistics.median(base), 4)
        rows.append(
            dict(
                row=row,
                method=meta["method"],
                objectives=meta["objectives"],
                router=meta["router"],
                dense_layers=meta["dense_layers"],
                tokens=tokens,
                step_ms=round(ms, 3),
                tokens_per_s=round(tokens / ms * 1e3, 1),
                peak_mem_mib=round(peaks[row], 1),
                ratio_to_baseline=round(ratio, 4),
                ratio_p25=round(p25, 4),
                ratio_p75=round(p75, 4),
                stgc_overhead_pct=over,
                amortised_ratio=amortised,
                **stamp,
            )
        )
    return rows


def _stgc_reference(row: str) -> str | None:
    """The row an STGC row's overhead is measured against: the method without STGC."""
    if row in ("stgc", "stgc_two_pass"):
        return BASELINE
    head, dense, tail = row.partition("@")
    if head.endswith("+stgc"):
        return head[: -len("+stgc")] + (dense + tail)
    return None


def _make_step(switch: MethodSwitch, label: str, objectives: ObjectiveSet, batch, index: int, opt):
    def step() -> None:
        switch.install(label)
        out = objectives.step_loss(switch.model, batch, index)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.prepare = lambda: opt.zero_grad(set_to_none=True)
    return step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("results/bench/step.csv"), help="CSV to write")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence (incl. 576 image tokens)")
    parser.add_argument(
        "--capacity-factor", type=float, default=None, help="MoE capacity (default: dropless)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10; --quick: 2)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed rounds first (default 2; --quick: 1)"
    )
    parser.add_argument("--quick", action="store_true", help="the tiny model on the CPU (smoke test)")


def run(args: argparse.Namespace) -> int:
    rounds = {k: v for k, v in (("warmup", args.warmup), ("repeats", args.repeats)) if v is not None}
    if args.quick:
        bench = dataclasses.replace(StepBench.quick(), **rounds)
        device = torch.device("cpu")
    else:
        bench = StepBench(batch=args.batch, seq=args.seq, capacity_factor=args.capacity_factor, **rounds)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type != "cuda":
            raise ValueError("the full-size step benchmark needs a GPU; use --quick for the CPU smoke test.")
    threads = torch.get_num_threads()
    if args.quick:  # tiny matrices: one thread (two wait on each other on a busy 2-core machine)
        torch.set_num_threads(1)
    try:
        rows = run_benchmark(bench, device)
    finally:
        torch.set_num_threads(threads)
    write_csv(rows, args.out, COLUMNS)
    print(f"{'row':<24} {'ms':>9} {'tok/s':>10} {'MiB':>9} {'x base':>7} {'+stgc %':>8} {'amort.':>7}")
    for r in rows:
        print(
            f"{r['row']:<24} {r['step_ms']:9.2f} {r['tokens_per_s']:10.0f} {r['peak_mem_mib']:9.1f} "
            f"{r['ratio_to_baseline']:7.3f} {r['stgc_overhead_pct']!s:>8} {r['amortised_ratio']!s:>7}"
        )
    print(f"wrote {args.out}")
    return 0
