"""The lmms-eval model `stgc_moe_llava`: any checkpoint of this project, through lmms-eval, unforked.

Registered through the `lmms_eval.models` entry point (pyproject.toml -> `manifest` below), which lmms-eval
0.7.3 reads when `lmms_eval.models` is imported; `--model stgc_moe_llava` then resolves to `StgcMoeLlava`.

    python -m lmms_eval --model stgc_moe_llava --model_args pretrained=runs/x/checkpoint-100 \\
        --include_path <folder from evals.tasks.write_task_dir> --tasks stgc_gqa --batch_size 8
    accelerate launch --num_processes 8 -m lmms_eval --model stgc_moe_llava ...   (data parallel)

model_args (`--model_args k=v,...`):
    pretrained        checkpoint folder (config.json of model_type `stgc_moe_llava`, weights, processor)
    device            default: the process's device under `accelerate launch`, else cuda if present, else cpu
    dtype             "auto" (the checkpoint's), "float32", "bfloat16", "float16"
    max_new_tokens    used when a task's generation_kwargs set none (default 128, MoE-LLaVA's eval default)
    batch_size        from lmms-eval's --batch_size (requests per forward, per process)

Generation is batched with left padding, greedy unless a task asks for temperature > 0, stops at EOS and at
the task's `until` strings (the reply is also cut at the first of them), and is deterministic.

A request that fails (its batch is retried one request at a time) is answered "" and reported on stderr;
when every request of a task fails the adapter raises `RequestsFailed`, and bad model_args or checkpoints
raise `AdapterInputError`: both are `SystemExit`s (`AdapterExit`), because lmms-eval's CLI catches every
`Exception`, logs it and exits 0, and neither may look like a finished evaluation. `evals.run.evaluate`
turns them back into ordinary exceptions. With a
capacity factor (token dropping) routing depends on the batch, so scores depend on the batch size; the
default MoE config routes every token and batched answers equal batch-1 answers (tested).

Routing traces come from `stgc analyze capture` (`analysis.capture`), which drives this adapter's prompts
and the model's own generation.
"""

from __future__ import annotations

from typing import Any

MODEL_NAME = "stgc_moe_llava"


def manifest():
    """The entry point's payload (lmms-eval calls it). A function defined before any lmms_eval import:
    importing this module first imports lmms_eval.models, which loads the entry point from this module while
    it is still half-initialised; a module-level ModelManifest would not exist yet at that moment."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path="evals.lmms_model.StgcMoeLlava")


import torch  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from tqdm import tqdm  # noqa: E402

from evals.checkpoint import check_checkpoint  # noqa: E402
from stgc.logs import verbose  # noqa: E402


class AdapterExit(SystemExit):
    """The adapter cannot answer. A SystemExit (exit status 1, the message on stderr) so that
    `python -m lmms_eval`, which turns any Exception into a log line and exit status 0, stops with an
    error."""


class AdapterInputError(AdapterExit):
    """Bad model_args or checkpoint: one line naming the problem and the fix."""


class RequestsFailed(AdapterExit):
    """Every request of at least one task failed."""


def _one_line(err: BaseException) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= 300 else text[:297] + "..."


def _checkpoint_clusters(model: Any, path: Any) -> Any:
    """The instruction clusters a checkpoint routes on (MoCLE-style routers), loaded with the model from
    its ``instruction_clusters.json``; an error when its router needs them and the folder has none."""
    from stgc.clusters import CLUSTERS_NAME, uses_instruction_clusters

    if not uses_instruction_clusters(model.config.moe_config):
        return None
    clusters = getattr(model, "instruction_clusters", None)
    if clusters is None:
        raise ValueError(
            f"{path} routes on instruction clusters (router {model.config.moe_config.router.name!r}) but has "
            f"no {CLUSTERS_NAME}; copy it from the run's training checkpoint."
        )
    clusters.check(model.config.moe_config.router.num_clusters)
    clusters.check_embedder()
    return clusters


def _cut_at(text: str, until: list[str]) -> str:
    """The reply up to the first occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


class StgcMoeLlava(lmms):
    """lmms-eval model for `MoELlavaForConditionalGeneration` checkpoints (see the module docstring)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int | str = 128,
        max_batch_size: int
        | None = None,  # passed by lmms-eval's simple_evaluate; auto batch size is not supported
        **unexpected: Any,
    ) -> None:
        super().__init__()
        if unexpected:
            raise AdapterInputError(
                f"{MODEL_NAME}: unknown model_args {sorted(unexpected)}; valid: pretrained, device, "
                "dtype, max_new_tokens"
            )
        from accelerate import Accelerator
        from transformers import AutoModelForImageTextToText, AutoProcessor

        import stgc  # noqa: F401  (registers the model with the Auto classes)

        try:
            path = check_checkpoint(pretrained)
        except ValueError as err:
            raise AdapterInputError(f"{MODEL_NAME}: {err}") from None
        if str(batch_size).startswith("auto") or not str(batch_size).isdigit() or int(batch_size) < 1:
            raise AdapterInputError(
                f"{MODEL_NAME}: batch_size={batch_size!r} is not supported; pass an integer >= 1 "
                "(automatic batch size is not supported)"
            )
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:
            # Data parallel: every process holds the whole model and answers its shard of the requests
            # (lmms-eval shards by rank); nothing is wrapped, evaluation has no gradients to synchronise.
            self._device = self.accelerator.device
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = dtype if dtype == "auto" else getattr(torch, str(dtype))
        self._model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch_dtype)
        self._model.to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(str(path))
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation continues every row at the same position
        self.pretrained = str(path)
        try:
            self.clusters = _checkpoint_clusters(self._model, path)
        except ValueError as err:
            raise AdapterInputError(f"{MODEL_NAME}: {err}") from None

    def clean(self) -> None:
        """lmms-eval calls this at the end of every evaluate() and its default deletes every nn.Module
        attribute, so the adapter could not run a second evaluation (sweeps over task groups, benchmarks
        that alternate settings). Free cached memory only; the model goes with the adapter object."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # lmms-eval reads these
    @property
    def model(self):
        return self._model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    # ------------------------------------------------------------------------------------------- prompts
    def _doc(self, task: str, split: str, doc_id: int) -> dict[str, Any]:
        return self.task_dict[task][split][doc_id]

    def _prompt(self, context: str, num_images: int, continuation: str | None = None) -> str:
        """The chat-template rendering of one user turn (and the assistant's reply, without EOS)."""
        if "<image>" in context or num_images == 0:
            content: Any = context
        else:
            content = [{"type": "image"}] * num_images + [{"type": "text", "text": context}]
        messages = [{"role": "user", "content": content}]
        if continuation is None:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": continuation})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        eos = self.tokenizer.eos_token or ""
        return text[: -len(eos)] if eos and text.endswith(eos) else text

    def _with_clusters(
        self, inputs: dict[str, torch.Tensor], instructions: list[str]
    ) -> dict[str, torch.Tensor]:
        """``inputs`` plus each prompt's instruction cluster (``cluster_ids``, from the task's contexts) when
        the checkpoint routes on instruction clusters (MoCLE-style; ``stgc.clusters``)."""
        if self.clusters is not None:
            ids = torch.from_numpy(self.clusters.predict(instructions))
            inputs["cluster_ids"] = ids.to(inputs["input_ids"].device)
        return inputs

    def _inputs(self, prompts: list[str], visuals: list[list[Any]]) -> dict[str, torch.Tensor]:
        images = [im for per_request in visuals for im in per_request]
        inputs = self.processor(
            images=images or None, text=prompts, return_tensors="pt", padding=True, add_special_tokens=True
        )
        inputs = inputs.to(self._device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        return dict(inputs)

    # --------------------------------------------------------------------------------------- generation
    def generate_until(self, requests) -> list[str]:
        from lmms_eval import utils

        # Longest prompts first (OOMs surface at once); requests with different generation kwargs never
        # share a batch.
        collator = utils.Collator(
            [r.args for r in requests], lambda args: (-len(args[0]), args[0]), grouping=True
        )
        replies: list[str] = []
        failures: dict[str, list[str]] = {}
        # the sweep's and the demo's evaluation bar counts tasks; this per-call bar shows with --verbose
        pbar = tqdm(
            total=len(requests), disable=self.rank != 0 or not verbose(), desc="stgc_moe_llava generate"
        )
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            try:
                replies.extend(self._answer(chunk))
            except Exception as err:  # noqa: BLE001 - retried one by one; the failures are reported below
                if len(chunk) == 1:
                    failures.setdefault(chunk[0][4], []).append(_one_line(err))
                    replies.append("")
                else:
                    for one in chunk:
                        try:
                            replies.extend(self._answer([one]))
                        except Exception as one_err:  # noqa: BLE001
                            failures.setdefault(one[4], []).append(_one_line(one_err))
                            replies.append("")
            pbar.update(len(chunk))
        pbar.close()
        self._report_failures(failures, [r.args[4] for r in requests])
        return collator.get_original(replies)

    def _answer(self, chunk) -> list[str]:
        """The replies to one batch of requests (their `args` tuples)."""
        contexts, all_gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
        gen_kwargs = dict(all_gen_kwargs[0])
        visuals = [list(doc_to_visual[0](self._doc(t, s, d))) for t, s, d in zip(tasks, splits, doc_ids)]
        prompts = [self._prompt(c, len(v)) for c, v in zip(contexts, visuals)]
        inputs = self._with_clusters(self._inputs(prompts, visuals), list(contexts))
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        return self._generate(inputs, gen_kwargs, until)

    def _report_failures(self, failures: dict[str, list[str]], request_tasks: list[str]) -> None:
        """Failed requests on stderr; RequestsFailed when every request of a task failed."""
        import sys

        totals: dict[str, int] = {}
        for task in request_tasks:
            totals[task] = totals.get(task, 0) + 1
        for task, errors in failures.items():
            if len(errors) < totals[task]:
                print(
                    f"{MODEL_NAME}: {len(errors)} of {totals[task]} requests of task {task} failed and are "
                    f"scored as empty answers; first error: {errors[0]}",
                    file=sys.stderr,
                )
        dead = [task for task, errors in failures.items() if len(errors) == totals[task]]
        if dead:
            raise RequestsFailed(
                f"{MODEL_NAME}: every request of task(s) {', '.join(dead)} failed ({self.pretrained}); first "
                f"error: {failures[dead[0]][0]}"
            )

    @torch.inference_mode()
    def _generate(
        self,
        inputs: dict[str, torch.Tensor],
        gen_kwargs: dict[str, Any],
        until: list[str],
    ) -> list[str]:
        temperature = float(gen_kwargs.get("temperature") or 0)
        sampling = temperature > 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            do_sample=sampling,
            num_beams=int(gen_kwargs.get("num_beams") or 1),
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eot_token_id,
        )
        if sampling:
            kwargs.update(temperature=temperature, top_p=gen_kwargs.get("top_p") or 1.0)
        else:  # generation_config defaults of a checkpoint must not turn sampling back on
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if until:  # stop early; the reply is cut at the stop string below either way
            kwargs.update(stop_strings=until, tokenizer=self.tokenizer)
        out_BS = self._model.generate(**inputs, **kwargs)
        new_BN = out_BS[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_BN, skip_special_tokens=True)
        return [_cut_at(t, until) for t in texts]

    # ---------------------------------------------------------------------------------- loglikelihood
    @torch.inference_mode()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Sum of the continuation's token log-probabilities after the prompt, and whether greedy decoding
        would produce it; one request per forward (no lmms-eval task of this project uses it)."""
        out = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            doc = self._doc(task, split, doc_id)
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            visuals = [list(doc_to_visual(doc))]
            prompt = self._prompt(context, len(visuals[0]))
            full = self._prompt(context, len(visuals[0]), continuation=continuation)
            prompt_ids = self._inputs([prompt], visuals)["input_ids"][0]
            inputs = self._with_clusters(self._inputs([full], visuals), [context])
            ids = inputs["input_ids"][0]
            n = prompt_ids.shape[0]
            if ids.shape[0] <= n or not torch.equal(ids[:n], prompt_ids):
                raise ValueError(
                    f"{task} doc {doc_id}: the prompt's tokens are not a prefix of prompt + continuation "
                    f"{continuation!r}; the tokenizer splits across the boundary"
                )
            logits_SV = self._model(**inputs).logits[0].float()
            logprobs_CV = torch.log_softmax(logits_SV[n - 1 : -1], dim=-1)
            target_C = ids[n:]
            total = float(logprobs_CV.gather(-1, target_C[:, None]).sum())
            out.append((total, bool((logprobs_CV.argmax(-1) == target_C).all())))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{MODEL_NAME} answers single-turn tasks only")
