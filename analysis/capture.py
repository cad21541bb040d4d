"""Routing traces of a checkpoint on benchmark prompts: the expensive extraction, done once per checkpoint
(OLMoE's dump-once / analyse-many split; docs/architecture.md, Conventions); `analysis.metrics` then
reads the Parquet file many times.

    capture_routing("runs/tiny-stgc-seed0/checkpoint-200", ["stgc_scienceqa_img", "stgc_textvqa_val"],
                    "results/<sweep>/routing/stgc-seed0.parquet", limit=100)
    stgc analyze capture runs/tiny-stgc-seed0/checkpoint-200 --tasks stgc_scienceqa_img \
        --out results/<sweep>/routing/stgc-seed0.parquet --limit 100

Per sample, exactly what the evaluation feeds the model, then one teacher-forced forward:
1. lmms-eval builds the task's requests (`Task.build_all_requests`), so the question text is lmms-eval's own
   `doc_to_text` with the task YAML's pre/post prompts, the image is its `doc_to_visual`, and the documents
   are the ones its `process_docs` keeps (e.g. one POPE category). Task folders come from `evals.tasks`
   (mini suite under `--data-root`, or the hub source).
2. The project's lmms-eval model (`evals.lmms_model.StgcMoeLlava`) renders the chat-template prompt and
   runs the processor (which expands each `<image>` into the vision tower's number of tokens), as in
   `stgc eval`.
3. Greedy generation of the answer, at most `max_new_tokens` (default 16: enough for every short-answer
   benchmark; capped below a task's own limit to keep captures cheap), stopping at EOS or the task's stop
   strings. Greedy even where a task would sample: a trace must be reproducible.
4. One forward over prompt + generated tokens with `output_routing=True`, each sequence unpadded at the
   left (right padding; positions 0..n-1 as in generation, padding never written).

Modalities: "image" = the expanded image placeholder tokens, "text" = every other prompt token (BOS and
chat-template words included), "answer" = the generated tokens (the EOS that ended generation included).
E, K, the MoE layers and the image-token count come from the routing records and the config, never from
names (docs/architecture.md, Conventions). Trace columns and metadata: `analysis.schema`.

Shape legend: B batch, S sequence length, N new (generated) tokens, K top-k, E experts, L MoE layers.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import DEFAULT_MAX_NEW_TOKENS
from analysis.schema import (
    META_KEY,
    REQUIRED_META_KEYS,
    SCHEMA_VERSION_KEY,
    TRACE_COLUMNS,
    TRACE_SCHEMA,
    TRACE_SCHEMA_VERSION,
    read_trace_meta,
    traces_from_arrays,
    validate_traces,
)

RUN_CONFIG_NAME = "run_config.json"  # stgc.callbacks.RUN_CONFIG_NAME (not imported: it loads torch)


# --------------------------------------------------------------------------------------------------------
# input checks and checkpoint metadata


def check_out_path(out: str | os.PathLike, overwrite: bool) -> Path:
    """The output path of an expensive step: a .parquet file that does not exist yet (or `overwrite`)."""
    out = Path(out)
    if out.suffix != ".parquet":
        raise ValueError(f"--out {out} must be a .parquet file (e.g. results/<sweep>/routing/<name>.parquet)")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    if out.exists() and out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a .parquet file path")
    return out


def checkpoint_meta(checkpoint: str | os.PathLike, config: Any, seed: int | None = None) -> dict[str, Any]:
    """Trace / score metadata of a checkpoint: method (the config's routing_method name), seed (argument,
    else the run config saved in the checkpoint or its run folder, else None), num_experts, top_k,
    moe_layers."""
    path = Path(checkpoint)
    if seed is None:
        for candidate in (path / RUN_CONFIG_NAME, path.parent / RUN_CONFIG_NAME):
            if candidate.is_file():
                try:
                    seed = json.loads(candidate.read_text())["training"]["seed"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    seed = None
                break
    moe = config.moe_config
    return {
        "checkpoint": str(path),
        "method": str((config.routing_method or {}).get("name", "baseline")),
        "routing_method": dict(config.routing_method or {}),
        "seed": int(seed) if seed is not None else None,
        # the router's width: the bank's experts plus any null experts (AdaMoE), whose columns the traces
        # hold too; bank_experts: the experts that compute
        "num_experts": int(moe.router.width(moe.num_experts)),
        "bank_experts": int(moe.num_experts),
        "top_k": int(moe.top_k),
        "moe_layers": [int(i) for i in config.moe_layers],
    }


def resolve_task_names(names: Sequence[str]) -> list[str]:
    """Task names for lmms-eval: project task / group / suite names (`evals.tasks`), or mini-suite
    benchmark names ("scienceqa_img"), which map to that benchmark's first lmms-eval-protocol task."""
    from evals import tasks as T

    out = []
    for name in names:
        if name in T.TASKS or name in T.SUITES:
            out.append(name)
            continue
        matches = [t.name for t in T.TASKS.values() if t.benchmark == name and not t.subtasks]
        preferred = [t for t in matches if T.TASKS[t].protocol == T.LMMS_EVAL] or matches
        if not preferred:
            raise ValueError(
                f"unknown task or benchmark {name!r}; valid tasks: {', '.join(T.list_tasks())}; "
                f"benchmarks: {', '.join(sorted(T.MINI_SPLITS))}"
            )
        out.append(preferred[0])
    return T.expand_tasks(out)


def _leaf_tasks(task_dict: dict) -> list[tuple[str, Any]]:
    """(name, task) of every task of lmms-eval's task dict, groups flattened, in order."""
    out = []
    for key, value in task_dict.items():
        if isinstance(value, dict):
            out.extend(_leaf_tasks(value))
        else:
            out.append((str(key), value))
    return out


# --------------------------------------------------------------------------------------------------------
# one batch


def _generation_lengths(new_BN, eos_id: int | None, pad_id: int | None, image_token_id: int) -> list[int]:
    """Generated tokens kept per row: up to and including the first EOS; without one, up to the first
    padding (rows that finished earlier are padded by `generate`) or all N. A generated image placeholder
    (an untrained model may emit one) ends the answer before it: fed back, it would need an image."""
    lengths = []
    for row in new_BN.tolist():
        n = len(row)
        for i, token in enumerate(row):
            if eos_id is not None and token == eos_id:
                n = i + 1
                break
            if (pad_id is not None and token == pad_id) or token == image_token_id:
                n = i
                break
        lengths.append(n)
    return lengths


def _generate(model, tokenizer, inputs: dict, gen_kwargs: dict, max_new_tokens: int):
    """Greedy generation with the task's stop strings; returns the new tokens (B, N)."""
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else [u for u in until if u]
    task_max = int(gen_kwargs.get("max_new_tokens") or max_new_tokens)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=min(task_max, max_new_tokens),
        do_sample=False,
        num_beams=1,
        temperature=None,  # a checkpoint's generation_config must not turn sampling on
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if until:
        kwargs.update(stop_strings=until, tokenizer=tokenizer)
    out_BS = model.generate(**inputs, **kwargs)
    return out_BS[:, inputs["input_ids"].shape[1] :]


def _routing_forward(model, inputs: dict, new_BN, lengths: list[int], pad_id: int):
    """Right-padded forward over each row's real prompt tokens + its kept generated tokens.

    Returns (input_ids_BS, mask_BS, prompt_len_B, records)."""
    import torch

    mask = inputs["attention_mask"].bool()
    rows, prompt_lens = [], []
    for b in range(mask.shape[0]):
        prompt = inputs["input_ids"][b][mask[b]]
        rows.append(torch.cat([prompt, new_BN[b, : lengths[b]]]))
        prompt_lens.append(int(prompt.shape[0]))
    S = max(int(r.shape[0]) for r in rows)
    device = inputs["input_ids"].device
    ids_BS = torch.full((len(rows), S), pad_id, dtype=torch.long, device=device)
    mask_BS = torch.zeros((len(rows), S), dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        ids_BS[b, : row.shape[0]] = row
        mask_BS[b, : row.shape[0]] = 1
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    out = model(input_ids=ids_BS, attention_mask=mask_BS, output_routing=True, **extra)
    return ids_BS, mask_BS.bool(), prompt_lens, out.routing_records


def batch_traces(
    input_ids_BS,
    mask_BS,
    prompt_lens: Sequence[int],
    records: Sequence[Any],
    *,
    image_token_id: int,
    task: str,
    sample_ids: Sequence[str],
) -> pd.DataFrame:
    """Trace rows (analysis.schema) of one right-padded batch from its routing records (one per MoE layer).

    Padding is dropped; modality is "image" where input_ids == image_token_id, "answer" at positions
    >= the row's prompt length, "text" elsewhere."""
    ids_BS = input_ids_BS.cpu().numpy()
    real_BS = mask_BS.cpu().numpy().astype(bool)
    B, S = ids_BS.shape
    position_BS = np.broadcast_to(np.arange(S), (B, S))
    modality_BS = np.where(position_BS >= np.asarray(prompt_lens)[:, None], "answer", "text").astype(object)
    modality_BS[ids_BS == image_token_id] = "image"
    sample_BS = np.broadcast_to(np.asarray(sample_ids, dtype=object)[:, None], (B, S))
    pieces = []
    for record in records:
        K, E = record.top_k, record.num_experts
        topk_N = record.topk_idx_TK.reshape(B, S, K).cpu().numpy()[real_BS]
        weights_N = record.weights_TK.detach().float().reshape(B, S, K).cpu().numpy()[real_BS]
        probs_N = record.probs_TE.detach().float().reshape(B, S, E).cpu().numpy()[real_BS]
        pieces.append(
            traces_from_arrays(
                sample_id=sample_BS[real_BS],
                task=task,
                position=position_BS[real_BS],
                modality=modality_BS[real_BS],
                layer=record.layer_idx,
                topk_experts_NK=topk_N,
                topk_weights_NK=weights_N,
                probs_NE=probs_N,
            )
        )
    return pd.concat(pieces, ignore_index=True)


# --------------------------------------------------------------------------------------------------------
# streaming trace writer


class TraceWriter:
    """Writes a trace file batch by batch, in analysis.schema's format (what `schema.write_traces` writes).

    Why not `write_traces(one DataFrame)`: a full-size capture (576 image tokens + the prompt, 12 MoE
    layers, a few thousand samples) is tens of millions of rows, several GB as a DataFrame of per-row
    arrays; streamed, memory stays at one batch. Each batch is checked with `schema.validate_traces`
    against E and K and its layers against moe_layers; the metadata (known only at the end) goes into the
    footer at `close`. The file is written under a temporary name and renamed into place, so an
    interrupted capture never leaves a file that looks complete."""

    def __init__(self, out: Path, *, num_experts: int, top_k: int, moe_layers: Sequence[int]):
        import pyarrow.parquet as pq

        self.out, self.num_experts, self.top_k = out, num_experts, top_k
        self.moe_layers = set(int(i) for i in moe_layers)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        # store_schema=False: pyarrow would otherwise serialise the Arrow schema as it is now, without the
        # metadata added at close, and readers take the schema metadata from that copy. The Parquet types
        # (int16/int32/float32, lists, strings) read back as TRACE_SCHEMA's without it.
        self.writer = pq.ParquetWriter(self.tmp, TRACE_SCHEMA, compression="zstd", store_schema=False)
        self.rows = 0
        self.image_tokens: dict[tuple[str, str], int] = {}

    def write(self, df: pd.DataFrame) -> None:
        import pyarrow as pa

        validate_traces(df, num_experts=self.num_experts, top_k=self.top_k)
        unknown = sorted(set(df["layer"].astype(int).tolist()) - self.moe_layers)
        assert not unknown, (
            f"routing records of layers {unknown} outside moe_layers {sorted(self.moe_layers)}"
        )
        first_layer = df["layer"] == df["layer"].min()
        image = df[first_layer & (df["modality"] == "image")].groupby(["task", "sample_id"]).size()
        self.image_tokens.update({key: int(n) for key, n in image.items()})
        table = pa.Table.from_pandas(df[list(TRACE_COLUMNS)], schema=TRACE_SCHEMA, preserve_index=False)
        self.writer.write_table(table)
        self.rows += len(df)

    def close(self, meta: dict[str, Any], overwrite: bool) -> Path:
        missing = [key for key in REQUIRED_META_KEYS if key not in meta]
        assert not missing, f"trace metadata lacks {missing}"
        self.writer.add_key_value_metadata(
            {
                SCHEMA_VERSION_KEY: str(TRACE_SCHEMA_VERSION).encode(),
                META_KEY: json.dumps(meta, sort_keys=True),
            }
        )
        self.writer.close()
        if self.out.exists() and not overwrite:  # created while the capture ran
            self.tmp.unlink()
            raise ValueError(f"{self.out} appeared while capturing; pass --overwrite to replace it")
        os.replace(self.tmp, self.out)
        read_trace_meta(self.out)  # the footer reads back as a trace file
        return self.out

    def abort(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------
# the capture


def capture_routing(
    checkpoint: str | os.PathLike,
    tasks: Sequence[str],
    out: str | os.PathLike,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    source: str | None = None,
    data_root: str | os.PathLike | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    device: str | None = None,
    dtype: str = "auto",
    seed: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Capture the routing of `checkpoint` on `tasks` into the trace file `out` (see the module docstring).

    tasks: project task, group or suite names (`evals.tasks`), or mini-suite benchmark names.
    limit: documents per task (the first ones, lmms-eval's order). source / data_root: as `stgc eval`
    ("mini" with the suite under data_root, default data/mini; or "hub"). seed: the training seed for the
    metadata when the checkpoint has no run_config.json. Returns the written path.
    """
    say = log or (lambda _msg: None)
    out = check_out_path(out, overwrite)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or None for every document)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    names = resolve_task_names(tasks)
    from evals.run import check_inputs

    path, names, source, root = check_inputs(checkpoint, names, source, data_root)

    from evals.lmms_model import StgcMoeLlava
    from stgc.provenance import git_revision

    lm = StgcMoeLlava(pretrained=str(path), device=device, dtype=dtype, batch_size=batch_size)
    model = lm.model
    meta = checkpoint_meta(path, model.config, seed)
    writer = TraceWriter(
        out, num_experts=meta["num_experts"], top_k=meta["top_k"], moe_layers=meta["moe_layers"]
    )
    samples_per_task: dict[str, int] = {}
    clusters: dict[str, dict[str, int]] = {}  # task -> sample id -> instruction cluster (MoCLE-style)
    try:
        _capture_tasks(
            lm,
            names,
            source,
            root,
            limit,
            batch_size,
            max_new_tokens,
            writer,
            samples_per_task,
            say,
            clusters,
        )
    except BaseException:
        writer.abort()
        raise
    if writer.rows == 0:
        writer.abort()
        raise ValueError(f"tasks {names} yielded no documents to capture (limit={limit})")
    meta.update(
        tasks=list(samples_per_task),
        samples_per_task=samples_per_task,
        image_tokens_per_sample=max(writer.image_tokens.values(), default=0),
        source=source,
        data_root=str(root) if source == "mini" else None,
        limit=limit,
        max_new_tokens=max_new_tokens,
        dtype=str(model.dtype).removeprefix("torch."),
        git_revision=git_revision(),
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    if clusters:  # the cluster id each prompt was routed with (analysis.peers joins it for NMI)
        meta["instruction_clusters"] = clusters
    writer.close(meta, overwrite)
    layers = len(meta["moe_layers"])
    say(f"wrote {writer.rows} trace rows ({writer.rows // max(layers, 1)} tokens x {layers} layers) to {out}")
    return out


def _capture_tasks(
    lm, names, source, root, limit, batch_size, max_new_tokens, writer, samples_per_task, say, clusters=None
):
    """Generate and record every document of every task (see the module docstring) into `writer`."""
    import torch
    from lmms_eval.tasks import TaskManager, get_task_dict

    from evals import tasks as T
    from evals.lmms_model import MODEL_NAME

    model, tokenizer = lm.model, lm.tokenizer
    image_token_id = int(model.config.image_token_id)
    with tempfile.TemporaryDirectory(prefix="stgc-capture-tasks-") as tmp:
        task_dir = T.write_task_dir(tmp, source=source, mini_root=root)
        manager = TaskManager(include_path=str(task_dir), include_defaults=False, model_name=MODEL_NAME)
        leaves = _leaf_tasks(get_task_dict(names, manager))
        for name, task in leaves:
            if task.OUTPUT_TYPE != "generate_until":
                raise ValueError(f"task {name} is a {task.OUTPUT_TYPE} task; capture needs generation tasks")
            task.build_all_requests(limit=limit, rank=0, world_size=1)
            lm.task_dict[name] = task.dataset
            instances = sorted(task.instances, key=lambda inst: inst.args[3])
            for start in range(0, len(instances), batch_size):
                chunk = [inst.args for inst in instances[start : start + batch_size]]
                contexts, gen_kwargs, doc_to_visual, doc_ids, task_names, splits = zip(*chunk)
                docs = [lm._doc(t, s, d) for t, s, d in zip(task_names, splits, doc_ids)]
                visuals = [list(doc_to_visual[0](doc)) for doc in docs]
                prompts = [lm._prompt(c, len(v)) for c, v in zip(contexts, visuals)]
                # left-padded, as the evaluation's batches (+ instruction clusters where a router reads them)
                inputs = lm._with_clusters(lm._inputs(prompts, visuals), list(contexts))
                if clusters is not None and "cluster_ids" in inputs:
                    ids = inputs["cluster_ids"].tolist()
                    clusters.setdefault(name, {}).update({str(d): int(c) for d, c in zip(doc_ids, ids)})
                with torch.inference_mode():
                    new_BN = _generate(model, tokenizer, inputs, dict(gen_kwargs[0]), max_new_tokens)
                    lengths = _generation_lengths(
                        new_BN, tokenizer.eos_token_id, tokenizer.pad_token_id, image_token_id
                    )
                    ids_BS, mask_BS, prompt_lens, records = _routing_forward(
                        model, inputs, new_BN, lengths, tokenizer.pad_token_id
                    )
                writer.write(
                    batch_traces(
                        ids_BS,
                        mask_BS,
                        prompt_lens,
                        records,
                        image_token_id=image_token_id,
                        task=name,
                        sample_ids=[str(d) for d in doc_ids],
                    )
                )
            samples_per_task[name] = len(instances)
            say(f"{name}: {len(instances)} samples")
