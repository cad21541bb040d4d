"""RoMA: routing manifold alignment, a router-only post-training stage (Li, Li and Zhou, ICLR 2026,
"Routing Manifold Alignment Improves Generalization of Mixture-of-Experts LLMs"; code not public, the
paper is the specification; docs/baselines.md "RoMA").

    L = L_lm + lam * (1/B) sum_i sum_{j in N(i)} W_ij ||r_i - r_j||^2

- r_i: the routing weights (the router's distribution ``probs_TE``, softmax over experts) of sample i's
  last prompt token, concatenated over the last ``last_layers`` MoE layers (5; all when there are fewer).
  "Last prompt token" [ours; the paper says "last token"]: the token just before the sample's first answer
  token (the one whose hidden state predicts the answer; from the labels: the first position whose label
  is not -100, minus one); a sample whose answer was cut off by truncation uses its last real token.
- N(i): the ``k`` (3) nearest training samples to i by instruction embedding (Euclidean distance of unit
  all-MiniLM-L6-v2 embeddings of the first human turn, ``<image>`` removed: ``stgc.embeddings``) among
  the samples the model answers correctly, i itself excluded [ours]. "Answers correctly"
  (``stgc.data.answers``): greedy generation on the sample's first turn (its prompt, with its image), then
  exact match with the first answer after VQA answer normalisation [ours: the first turn of a multi-turn
  conversation].
- W_ij = exp(-d_ij^2 / 2 sigma^2), normalised over N(i); sigma = the median of every neighbour distance
  d_ij over the training set [ours, docs/baselines.md].
- The neighbours' r_j are cached without gradient (the model in eval mode, one pass over the correct
  samples) and refreshed at the start of every epoch; r_i comes from the step's own forward and carries
  the gradient. Batch mean over samples [ours].

The correctly answered set, the neighbour graph and the cache are built in ``before_epoch`` (the first
epoch, with the model being post-trained) and saved in the objective's state, so a resumed run keeps them.
A batch's samples are matched to the training set by the content of their token ids (the collator is
deterministic), so no sample index has to travel through the Trainer. Padding and image tokens take no
part in r (one token per sample); the image enters r through the attention of the prompt token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from stgc.data.answers import answers_correctly, eval_mode, first_turn, to_device
from stgc.data.collate import IGNORE_INDEX
from stgc.moe.record import RoutingContext, RoutingRecord
from stgc.objectives.base import Objective, StepInputs, TrainingData, register_objective
from stgc.objectives.config import RoMAConfig

# ---------------------------------------------------------------------------------------------------------
# pure parts


def sample_key(ids_S: Tensor) -> str:
    """A sample's identity: the digest of its real token ids."""
    return hashlib.sha1(ids_S.detach().to("cpu", torch.int64).numpy().tobytes()).hexdigest()


def batch_keys(input_ids_BS: Tensor, attention_mask_BS: Tensor | None) -> list[str]:
    if attention_mask_BS is None:
        return [sample_key(row) for row in input_ids_BS]
    return [sample_key(row[m.bool()]) for row, m in zip(input_ids_BS, attention_mask_BS)]


def last_prompt_positions(labels_BS: Tensor, attention_mask_BS: Tensor | None) -> Tensor:
    """Per sample, the position before its first answer token (labels != -100), or its last real token
    when no answer token is left."""
    B, S = labels_BS.shape
    pos_S = torch.arange(S, device=labels_BS.device)
    answer_BS = labels_BS != IGNORE_INDEX
    first_B = torch.where(answer_BS.any(1), torch.where(answer_BS, pos_S, S).amin(1), -1)
    if attention_mask_BS is None:
        last_B = torch.full((B,), S - 1, device=labels_BS.device)
    else:
        last_B = torch.where(attention_mask_BS.bool(), pos_S, -1).amax(1)
    return torch.where(first_B > 0, first_B - 1, last_B.clamp_min(0))


def routing_vectors(records: Sequence[RoutingRecord], layers: Sequence[int], pos_B: Tensor) -> Tensor:
    """r (B, len(layers) * R): the router distributions of token ``pos_B[b]`` of each sample in the given
    MoE layers, concatenated in layer order (fp32, with the records' gradient)."""
    by_layer = {r.layer_idx: r for r in records}
    missing = [i for i in layers if i not in by_layer]
    if missing:
        raise ValueError(f"roma: this forward recorded no routing for MoE layers {missing}.")
    B = pos_B.shape[0]
    parts = []
    for i in layers:
        probs_TR = by_layer[i].probs_TE
        S = probs_TR.shape[0] // B
        parts.append(probs_TR[torch.arange(B, device=pos_B.device) * S + pos_B].float())
    return torch.cat(parts, -1)


def neighbour_graph(
    embeddings_ND: Tensor, correct_C: Tensor, k: int, chunk: int = 4096
) -> tuple[Tensor, Tensor, float]:
    """For every sample, its ``k`` nearest correct samples (itself excluded) by Euclidean distance and their
    normalised Gaussian weights. Returns neighbours_NK (positions in ``correct_C``, -1 where a sample has
    fewer than k candidates), weights_NK (0 there) and sigma (the median neighbour distance)."""
    N, C = embeddings_ND.shape[0], correct_C.numel()
    emb = embeddings_ND.float()
    cand_CD = emb[correct_C]
    K = min(k, C)
    dist_NK = torch.empty(N, K)
    nbr_NK = torch.empty(N, K, dtype=torch.long)
    for start in range(0, N, chunk):
        rows = torch.arange(start, min(N, start + chunk))
        d_RC = torch.cdist(emb[rows], cand_CD)
        d_RC[rows[:, None] == correct_C[None, :]] = float("inf")  # not its own neighbour
        d, j = d_RC.topk(K, dim=1, largest=False)
        dist_NK[rows], nbr_NK[rows] = d, j
    valid_NK = torch.isfinite(dist_NK)
    finite = dist_NK[valid_NK]
    sigma = float(finite.median()) if finite.numel() else 1.0
    sigma = max(sigma, 1e-6)  # identical instructions everywhere: any sigma gives uniform weights
    w_NK = torch.where(valid_NK, torch.exp(-dist_NK.square() / (2 * sigma**2)), 0.0)
    w_NK = w_NK / w_NK.sum(1, keepdim=True).clamp_min(1e-12)
    return torch.where(valid_NK, nbr_NK, -1), w_NK, sigma


def alignment(r_BD: Tensor, neighbours_BK: Tensor, weights_BK: Tensor, cache_CD: Tensor) -> Tensor:
    """(1/B) sum_i sum_j W_ij ||r_i - r_j||^2 (absent neighbours: weight 0)."""
    r_j = cache_CD[neighbours_BK.clamp_min(0)]
    sq_BK = (r_BD[:, None, :] - r_j).square().sum(-1)
    return (weights_BK * sq_BK).sum(-1).mean()


# ---------------------------------------------------------------------------------------------------------
# the objective


@register_objective
class RoMA(Objective):
    """lam * the alignment term above (``method.roma.*``); the preset trains the routers only
    (``training.trainable=router``) and starts from the base recipe's MoE checkpoint."""

    name = "roma"
    config: RoMAConfig

    def __init__(self, config: RoMAConfig, moe) -> None:
        super().__init__(config, moe)
        self.layers: tuple[int, ...] = ()
        self.keys: list[str] = []
        self.index: dict[str, int] = {}
        self.correct_C: Tensor | None = None
        self.neighbours_NK: Tensor | None = None
        self.weights_NK: Tensor | None = None
        self.cache_CD: Tensor | None = None
        self.cache_epoch = -1
        self.sigma = float("nan")

    def prepare(self, *, max_steps: int, moe_layers: tuple[int, ...], seed: int) -> None:
        self.layers = tuple(sorted(moe_layers))[-self.config.last_layers :]

    def check(self, moe_layers: tuple[int, ...]) -> None:
        self.prepare(max_steps=0, moe_layers=moe_layers, seed=0)

    # --- stage preparation ---------------------------------------------------------------------------
    def before_epoch(self, epoch: int, data: TrainingData) -> None:
        if data.dataset is None or data.collator is None:
            raise ValueError("roma needs the training set and its collator (run it through stgc train).")
        if self.neighbours_NK is None:
            self._build_graph(data)
        if self.cache_epoch != epoch:
            self._refresh_cache(data.model, data.dataset, data.collator)
            self.cache_epoch = epoch

    def _build_graph(self, data: TrainingData) -> None:
        """One pass over the training set, a batch at a time (images are decoded per batch): which samples
        the model answers correctly, their identities and instructions; then embeddings and neighbours."""
        from stgc.embeddings import embed_instructions

        processor = getattr(data.collator, "processor", None)
        if processor is None:
            raise ValueError("roma needs a collator with a processor (stgc.data.collate.LlavaCollator).")
        c, dataset = self.config, data.dataset
        N = len(dataset)
        correct, keys, instructions = [], [], []
        for start in range(0, N, c.judge_batch_size):
            rows = [dataset[i] for i in range(start, min(N, start + c.judge_batch_size))]
            correct.append(answers_correctly(data.model, rows, processor, len(rows), c.max_new_tokens))
            batch = data.collator(rows)
            keys += batch_keys(batch["input_ids"], batch.get("attention_mask"))
            for row in rows:
                text, human, _ = first_turn(row["conversations"])
                instructions.append(text or human)
        correct_N = np.concatenate(correct) if correct else np.zeros(0, dtype=bool)
        n_correct = int(correct_N.sum())
        if n_correct < c.k:
            raise ValueError(
                f"roma: the checkpoint answers {n_correct} of the {N} training samples correctly (exact "
                f"match after normalisation), fewer than roma.k={c.k}: RoMA's neighbours are correctly "
                "answered samples. Post-train a better-trained MoE checkpoint (model.init), use more "
                f"training data, or lower method.roma.k to at most {max(n_correct, 1)}."
                if n_correct
                else f"roma: the checkpoint answers none of the {N} training samples correctly (exact match "
                "after normalisation); RoMA's neighbours are correctly answered samples. Post-train a "
                "better-trained MoE checkpoint (model.init) or use more training data."
            )
        embeddings = torch.from_numpy(embed_instructions(instructions, model=c.embedding_model))
        self._set_graph(keys, embeddings, torch.from_numpy(np.flatnonzero(correct_N)))

    def _set_graph(self, keys: list[str], embeddings_ND: Tensor, correct_C: Tensor) -> None:
        self.keys = keys
        self.index = {}
        for i, key in enumerate(keys):
            self.index.setdefault(key, i)  # a duplicated sample is the same sample
        self.correct_C = correct_C.long()
        graph = neighbour_graph(embeddings_ND, self.correct_C, self.config.k)
        self.neighbours_NK, self.weights_NK, self.sigma = graph

    @torch.no_grad()
    def _refresh_cache(self, model: nn.Module, dataset: Any, collator) -> None:
        """r_j of every correct sample with the current model (eval mode, no gradient)."""
        assert self.correct_C is not None
        param = next(model.parameters())
        parts = []
        with eval_mode(model):
            ids = self.correct_C.tolist()
            for start in range(0, len(ids), self.config.judge_batch_size):
                batch = collator([dataset[i] for i in ids[start : start + self.config.judge_batch_size]])
                parts.append(self._vectors(model, to_device(batch, param.device, param.dtype)).cpu())
        self.cache_CD = torch.cat(parts)

    def _vectors(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        ctx = RoutingContext(records=[])
        model(**batch, routing_ctx=ctx)
        pos_B = last_prompt_positions(batch["labels"], batch.get("attention_mask"))
        return routing_vectors(ctx.records, self.layers, pos_B)

    def synthetic_setup(self, model: nn.Module, inputs: dict[str, Any]) -> None:
        """The batch as the whole training set, every sample correct, random instruction embeddings (a
        fixed seed), the cache from a no-grad forward of the batch: what the step costs, not what it
        learns."""
        B = inputs["input_ids"].shape[0]
        g = torch.Generator().manual_seed(0)
        emb = torch.nn.functional.normalize(torch.randn(B, 16, generator=g), dim=-1)
        self._set_graph(batch_keys(inputs["input_ids"], inputs.get("attention_mask")), emb, torch.arange(B))
        param = next(model.parameters())
        with torch.no_grad(), eval_mode(model):
            self.cache_CD = self._vectors(model, to_device(inputs, param.device, param.dtype)).cpu()
        self.cache_epoch = 0

    # --- the step ------------------------------------------------------------------------------------
    def before_backward(self, step_inputs: StepInputs, observer) -> dict[str, Tensor]:
        if self.neighbours_NK is None or self.cache_CD is None:
            raise ValueError(
                "roma: no neighbour graph: the stage's preparation (before_epoch, run by stgc train at the "
                "start of each epoch) has not run; for synthetic inputs call synthetic_setup first."
            )
        inputs = step_inputs.inputs
        keys = batch_keys(inputs["input_ids"], inputs.get("attention_mask"))
        unknown = [k for k in keys if k not in self.index]
        if unknown:
            raise ValueError(
                f"roma: {len(unknown)} sample(s) of this batch are not in the training set the stage was "
                "prepared on (its neighbours are unknown); train on the same data.train as the preparation."
            )
        idx_B = torch.tensor([self.index[k] for k in keys])
        pos_B = last_prompt_positions(inputs["labels"], inputs.get("attention_mask"))
        r_BD = routing_vectors(step_inputs.ctx.records, self.layers, pos_B)
        dev = r_BD.device
        return {
            "roma": alignment(
                r_BD,
                self.neighbours_NK[idx_B].to(dev),
                self.weights_NK[idx_B].to(dev),
                self.cache_CD.to(dev),
            )
        }

    def coefficients(self, step: int) -> dict[str, float]:
        return {"roma": self.config.lam}

    def metrics(self, records, observer) -> dict[str, float]:
        if self.correct_C is None:
            return {}
        return {
            "roma/correct_fraction": self.correct_C.numel() / max(1, len(self.keys)),
            "roma/sigma": self.sigma,
        }

    # --- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.neighbours_NK is None:
            return {}
        return {
            "keys": list(self.keys),
            "correct": self.correct_C,
            "neighbours": self.neighbours_NK,
            "weights": self.weights_NK,
            "cache": self.cache_CD,
            "cache_epoch": self.cache_epoch,
            "sigma": self.sigma,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.keys = list(state["keys"])
        self.index = {}
        for i, key in enumerate(self.keys):
            self.index.setdefault(key, i)
        self.correct_C, self.neighbours_NK = state["correct"], state["neighbours"]
        self.weights_NK, self.cache_CD = state["weights"], state["cache"]
        self.cache_epoch, self.sigma = int(state["cache_epoch"]), float(state["sigma"])
