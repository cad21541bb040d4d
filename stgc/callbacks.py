"""Trainer callbacks and the per-step metrics they write (docs/architecture.md, Conventions).

``metrics.jsonl`` (rank 0, one JSON object per optimizer step, appended as the run goes) holds:
- ``step`` (optimizer step, 1-based), ``epoch``, ``method``, ``lr`` (the rate used by this step)
- ``loss/total``, ``loss/lm`` and every regulariser term unscaled and scaled (``loss/aux``,
  ``loss/aux_scaled``, ``loss/cel``, ``loss/cel_scaled``, ...), each the mean over the step's micro-batches
- on steps with token gradients (every step for STGC; every ``measure_conflict_every`` steps otherwise):
  ``conflict/layer{i}/{fraction,mean_cos,cel,pairs}`` and ``conflict/{fraction,mean_cos}`` (the mean
  over layers); fraction and mean_cos are pooled over the micro-batches (weighted by pairs)
- ``routing/layer{i}/imbalance`` (max / mean of tokens per expert over the step's real tokens),
  ``routing/layer{i}/entropy`` (mean router entropy of real tokens, nats) and their means over layers;
  ``routing/layer{i}/share_e{e}`` (share of the step's assignments routed to expert e)
- ``perf/step_time_s``, ``perf/tokens`` (real tokens of the step on this rank), ``perf/tokens_per_s``,
  ``perf/peak_mem_mb`` with ``perf/mem_kind`` ("cuda": peak allocated during the step; "rss": the
  process's peak resident size so far)

Under data parallelism the values are rank 0's micro-batches (a sample of the global batch; the conflict
statistics use per-micro-batch expert means, docs/method.md section 3). Keys are present only when measured:
a step without token gradients has no ``conflict/*`` keys (never a silent zero).
``analysis.metrics.read_metrics_jsonl`` reads the file.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

RUN_CONFIG_NAME = "run_config.json"
METRICS_NAME = "metrics.jsonl"


# --------------------------------------------------------------------------------------------------------
# per-micro-batch measurements


def routing_stats(records) -> dict[str, float]:
    """Load imbalance and routing entropy per MoE layer from the routing records of one forward.

    imbalance = max_e n_e / mean_e n_e over the kept assignments of real tokens (1 = perfectly balanced,
    E = everything in one expert); entropy = mean over real tokens of -sum_e p_e log p_e.
    Also returns the raw counts (``routing/layer{i}/tokens_e{e}``) so that micro-batches pool exactly.
    """
    out: dict[str, float] = {}
    for r in records:
        counts = r.tokens_per_expert_E.detach().float().cpu()
        mask = r.token_mask_T
        p = r.probs_TE.detach().float()
        ent_T = -(p * p.clamp_min(1e-12).log()).sum(-1)
        n_real = int(mask.sum())
        out[f"routing/layer{r.layer_idx}/entropy"] = float(ent_T[mask].mean()) if n_real else math.nan
        out[f"routing/layer{r.layer_idx}/tokens"] = float(n_real)
        for e, c in enumerate(counts.tolist()):
            out[f"routing/layer{r.layer_idx}/tokens_e{e}"] = c
    return out


def aggregate_micro_batches(micro: list[dict[str, float]]) -> dict[str, float]:
    """One optimizer step's metrics from its micro-batches' (same keys, or a subset on some).

    losses and other values: mean over the micro-batches that have the key; conflict ``pairs``: sum;
    conflict ``fraction`` / ``mean_cos``: weighted by pairs; routing counts: summed, then turned into
    ``imbalance`` (max / mean); routing entropy: weighted by real tokens; layer means recomputed.
    """
    if not micro:
        return {}
    keys = list(dict.fromkeys(k for m in micro for k in m))
    out: dict[str, float] = {}
    sums: dict[str, float] = defaultdict(float)
    for key in keys:
        values = [(m[key], m) for m in micro if key in m]
        parts = key.split("/")
        if key.startswith("conflict/layer") and parts[-1] in ("fraction", "mean_cos"):
            pairs_key = "/".join(parts[:-1] + ["pairs"])
            w = [m.get(pairs_key, 0.0) for _, m in values]
            out[key] = sum(v * wi for (v, _), wi in zip(values, w)) / sum(w) if sum(w) else math.nan
        elif key.startswith("conflict/layer") and parts[-1] == "pairs":
            out[key] = sum(v for v, _ in values)
        elif key.startswith("routing/layer") and parts[-1].startswith("tokens"):
            sums[key] = sum(v for v, _ in values)
        elif key.startswith("routing/layer") and parts[-1] == "entropy":
            tok_key = "/".join(parts[:-1] + ["tokens"])
            w = [m.get(tok_key, 0.0) for _, m in values]
            good = [(v, wi) for (v, _), wi in zip(values, w) if wi > 0]
            out[key] = sum(v * wi for v, wi in good) / sum(wi for _, wi in good) if good else math.nan
        elif key in ("conflict/fraction", "conflict/mean_cos", "routing/imbalance", "routing/entropy"):
            continue  # recomputed from the layers below
        else:
            out[key] = sum(v for v, _ in values) / len(values)
    layers = sorted({k.split("/")[1] for k in sums})
    for layer in layers:
        counts = [v for k, v in sums.items() if k.startswith(f"routing/{layer}/tokens_e")]
        mean = sum(counts) / len(counts) if counts else 0.0
        out[f"routing/{layer}/imbalance"] = max(counts) / mean if mean > 0 else math.nan
        for e, c in enumerate(counts):
            out[f"routing/{layer}/share_e{e}"] = c / sum(counts) if mean > 0 else math.nan
    for prefix, stats in (("conflict", ("fraction", "mean_cos")), ("routing", ("imbalance", "entropy"))):
        for stat in stats:
            vals = [v for k, v in out.items() if k.startswith(f"{prefix}/layer") and k.endswith(f"/{stat}")]
            vals = [v for v in vals if not math.isnan(v)]
            if vals:
                out[f"{prefix}/{stat}"] = sum(vals) / len(vals)
    return out


def peak_memory_mb() -> tuple[float, str]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss"  # Linux: KiB


class StepBuffer:
    """Micro-batch metrics of the optimizer step in progress (filled by the trainer, drained per step)."""

    def __init__(self) -> None:
        self.micro: list[dict[str, float]] = []
        self.tokens = 0

    def add(self, metrics: dict[str, float], tokens: int) -> None:
        self.micro.append(metrics)
        self.tokens += tokens

    def drain(self) -> tuple[dict[str, float], int]:
        out, tokens = aggregate_micro_batches(self.micro), self.tokens
        self.micro, self.tokens = [], 0
        return out, tokens


# --------------------------------------------------------------------------------------------------------
# callbacks


class MetricsCallback(TrainerCallback):
    """Appends one line per optimizer step to ``<output_dir>/metrics.jsonl`` (world process zero only).

    On resume the lines of steps after the resumed checkpoint (written by the interrupted run) are dropped
    first, so the file holds each step once."""

    def __init__(self, path: Path, buffer: StepBuffer, method: str):
        self.path, self.buffer, self.method = Path(path), buffer, method
        self._t0 = 0.0
        self._lr = math.nan

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= state.global_step:
                        keep.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by a killed run
            # atomically: a kill while rewriting must not lose the steps being kept
            from stgc.checkpoints import atomic_write_text

            atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self._t0 = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            self._lr = float(optimizer.param_groups[0]["lr"])

    def on_step_end(self, args, state, control, **kwargs):
        metrics, tokens = self.buffer.drain()
        if not state.is_world_process_zero:
            return
        dt = time.perf_counter() - self._t0
        mem, kind = peak_memory_mb()
        record: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch, "method": self.method}
        record["lr"] = self._lr
        record.update({k: v for k, v in metrics.items() if "/tokens" not in k})
        record.update(
            {
                "perf/step_time_s": dt,
                "perf/tokens": tokens,
                "perf/tokens_per_s": tokens / dt if dt > 0 else math.nan,
                "perf/peak_mem_mb": mem,
                "perf/mem_kind": kind,
            }
        )
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")


class RunConfigCallback(TrainerCallback):
    """Writes the resolved run config into every checkpoint folder (world process zero only), so that a
    checkpoint says how it was trained and a resume can check it is continuing the same run.

    ``write_into_checkpoint`` is called by ``stgc.checkpoints.AtomicCheckpointMixin`` on the staged folder,
    before it is published; ``on_save`` covers a trainer without the mixin."""

    def __init__(self, config_json: str):
        self.config_json = config_json

    def write_into_checkpoint(self, args, state, folder: Path) -> None:
        (Path(folder) / RUN_CONFIG_NAME).write_text(self.config_json)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir() and not (folder / RUN_CONFIG_NAME).exists():
                from stgc.checkpoints import atomic_write_text

                atomic_write_text(folder / RUN_CONFIG_NAME, self.config_json)


class NonFiniteGradientGuard(TrainerCallback):
    """Stops the run (``error`` raised) when a gradient about to be applied is NaN / infinite, so that the bad
    update never reaches the weights or a checkpoint. Checks the gradients held on the parameters (under
    DeepSpeed ZeRO they live in the engine and are not checked here; the next step's loss check catches a
    bad update there)."""

    def __init__(self, error: type[Exception]):
        self.error = error

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        if not grads:
            return
        norms = torch._foreach_norm(grads)
        if not bool(torch.isfinite(torch.stack(norms)).all()):
            named = model.named_parameters()
            bad = [n for n, p in named if p.grad is not None and not bool(p.grad.isfinite().all())]
            raise self.error(
                f"non-finite gradient at optimizer step {state.global_step + 1} in {bad[:5]}"
                f"{' ...' if len(bad) > 5 else ''}; the run stopped before applying it. Resume from the last "
                "checkpoint with a lower training.lr, or check the data."
            )


class StopAtStepCallback(TrainerCallback):
    """Stops training after optimizer step ``step`` (a checkpoint is saved there): simulates an interrupted
    run in tests and lets a user cut a run short without changing its schedule."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True
