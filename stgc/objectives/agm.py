"""AGM: adaptive gradient modulation of two players of an LVLM, its image tokens and its text tokens (Li et
al., ICCV 2023, "Boosting Multi-modal Model Performance with Adaptive Gradient Modulation"; code
lihong2303/AGM_ICCV2023, ``model/*_net.py`` GradMod and ``run/*_main.py``; docs/baselines.md "AGM").

Per batch (each micro-batch):
- mono-modal responses by zero padding: f(I, T) the step's logits; f(0, T) with the image features zeroed
  (the image tokens' input embeddings to the language model, i.e. the projector's output, set to 0);
  f(I, 0) with the instruction zeroed (every real text token that is not an answer token: the prompt and
  the chat template), the answer tokens kept (they are the teacher-forced inputs of the answer);
- Shapley responses phi_I = (f(I,T) - f(0,T) + f(I,0)) / 2, phi_T = (f(I,T) - f(I,0) + f(0,T)) / 2;
- scores s_m = mean over the batch's answer tokens of -log max(softmax(phi_m)[label], 1e-8) (AGM clamps
  the probability at 1e-8; padding, image and instruction tokens are not scored, nor the answers of a
  text-only sample in a mixed batch);
- ratios r_I = exp(s_T - s_I), r_T = exp(s_I - s_T) and, from the running means sbar_m of all earlier
  batches (before this batch updates them; 0 at the start, as AGM's), rbar_I = exp(sbar_T - sbar_I),
  rbar_T = exp(sbar_I - sbar_T);
- kappa_m = exp(alpha * min(rbar_m - r_m, cap)) (alpha 1, cap 10); then sbar_m <- mean of s_m so far.
A dominant player (low s_m, so r_m > rbar_m) gets kappa_m < 1, the other kappa > 1.

Where kappa acts:
- ``lite`` [ours, default]: the two mono-modal forwards run without gradient, and kappa_m scales the
  gradient of every hidden state of player m entering each MoE layer (an identity in the forward,
  ``RoutingContext.input_hook``; the modality of a token is ``RoutingContext.modality_BT``; padding and
  answer tokens are text). With alpha = 0 both kappas are exactly 1 and the step is the baseline's, bit
  for bit.
- ``faithful``: the mono-modal forwards keep their graphs and the logits the LM loss sees are
  kappa-scaled Shapley responses, out = S_I(phi_I) + S_T(phi_T), S_m the identity whose backward
  multiplies by kappa_m (AGM's logit-level hooks); out equals f(I,T) in value up to rounding. It enters
  the step as the term L_lm(out) - L_lm(f(I,T)) with coefficient 1 (value ~0, gradient AGM's). Three
  forwards with graphs: memory-heavy, and refused with gradient checkpointing (the checkpoint replay
  cannot tell three forwards of one step apart).
kappa_I, kappa_T, s_I, s_T (and sbar) are logged every step; sbar and the batch count are the objective's
state, saved in every checkpoint and restored on resume. Training data without any image cannot be
modulated: a ValueError before the first step. A text-only batch of mixed data (LLaVA-665K's text rows,
batched apart by the modality-grouped sampler) has one player only: it trains unmodulated (kappa 1),
leaves the running means alone and is counted in ``agm/text_only_batch`` [ours].
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from stgc.data.collate import IGNORE_INDEX
from stgc.moe.record import RoutingContext
from stgc.objectives.base import Objective, StepInputs, TrainingData, register_objective
from stgc.objectives.config import AGMConfig

MODALITY_IMAGE = 1  # stgc.modeling.MODALITY_IMAGE (not imported: stgc.modeling pulls in transformers' LLaVA)
PROB_FLOOR = 1e-8  # AGM's clamp of the label probability


def shapley(full: Tensor, no_image: Tensor, no_text: Tensor) -> tuple[Tensor, Tensor]:
    """(phi_I, phi_T) from f(I,T), f(0,T) and f(I,0)."""
    return 0.5 * (full - no_image + no_text), 0.5 * (full - no_text + no_image)


def answer_score(logits_BSV: Tensor, labels_BS: Tensor) -> Tensor:
    """Mean over answer tokens of -log max(p(label), 1e-8), with the causal shift (fp32)."""
    logits = logits_BSV[:, :-1].float()
    labels = labels_BS[:, 1:]
    keep = labels != IGNORE_INDEX
    logp = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    nll = -logp.clamp_min(math.log(PROB_FLOOR))
    return (nll * keep).sum() / keep.sum().clamp_min(1)


def agm_kappa(
    s_I: float, s_T: float, sbar_I: float, sbar_T: float, alpha: float, cap: float
) -> tuple[float, float]:
    """kappa_I, kappa_T = exp(alpha * min(rbar_m - r_m, cap)) (AGM's coefficients)."""
    r_I, r_T = math.exp(s_T - s_I), math.exp(s_I - s_T)
    rbar_I, rbar_T = math.exp(sbar_T - sbar_I), math.exp(sbar_I - sbar_T)
    return math.exp(alpha * min(rbar_I - r_I, cap)), math.exp(alpha * min(rbar_T - r_T, cap))


class _ScaleGrad(torch.autograd.Function):
    """Identity; the backward multiplies the gradient by ``scale`` (a float or a per-token tensor read at
    backward time from ``source()``)."""

    @staticmethod
    def forward(ctx, x: Tensor, source) -> Tensor:
        ctx.source = source
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        scale = ctx.source()
        if scale is None:
            return grad, None
        if isinstance(scale, Tensor):
            scale = scale.to(grad.dtype).reshape(*scale.shape, *([1] * (grad.dim() - scale.dim())))
        return grad * scale, None


@contextlib.contextmanager
def zeroed_embeddings(model: nn.Module, zero_BS: Tensor) -> Iterator[None]:
    """Inside: the language model's input embeddings are 0 where ``zero_BS`` (after the image features were
    put in place: LLaVA's ``model.model.language_model`` takes ``inputs_embeds``)."""
    lm = getattr(getattr(model, "model", None), "language_model", None)
    if lm is None:
        raise ValueError(
            f"agm needs a LLaVA-style model (model.model.language_model); {type(model).__name__} has none."
        )

    def hook(module, args, kwargs):
        emb = kwargs["inputs_embeds"]
        kwargs["inputs_embeds"] = emb * (~zero_BS).to(emb.dtype)[..., None]
        return args, kwargs

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def kept_block_contexts(model: nn.Module) -> Iterator[None]:
    """Extra forwards inside a step leave the MoE blocks' routing contexts as the step's forward set them
    (with gradient checkpointing the backward replays each block in the context it finds attached)."""
    blocks = [m for m in model.modules() if hasattr(m, "routing_ctx")]
    saved = [b.routing_ctx for b in blocks]
    try:
        yield
    finally:
        for b, ctx in zip(blocks, saved, strict=True):
            b.routing_ctx = ctx


@register_objective
class AGM(Objective):
    """AGM's modulation of image vs text tokens (``method.agm.*``; see the module docstring)."""

    name = "agm"
    config: AGMConfig

    def __init__(self, config: AGMConfig, moe) -> None:
        super().__init__(config, moe)
        self.sbar = {"image": 0.0, "text": 0.0}
        self.batches = 0
        self.kappa = {"image": 1.0, "text": 1.0}
        self.last: dict[str, float] = {}

    # --- checks --------------------------------------------------------------------------------------
    def before_epoch(self, epoch: int, data: TrainingData) -> None:
        from stgc.data.sampling import modality_lengths

        self._check_checkpointing(data.model)
        lengths = modality_lengths(data.dataset) if data.dataset is not None else None
        if lengths is not None and all(n < 0 for n in lengths):
            raise ValueError(
                f"agm modulates image tokens against text tokens, but none of the {len(lengths)} training "
                "rows has an image: text-only data. Train AGM on multimodal data or pick another method."
            )

    def _check_checkpointing(self, model: nn.Module) -> None:
        if self.config.mode == "faithful" and getattr(model, "is_gradient_checkpointing", False):
            raise ValueError(
                "agm.mode='faithful' keeps the graphs of three forwards per step, which gradient "
                "checkpointing cannot replay; set training.gradient_checkpointing=false or agm.mode=lite."
            )

    # --- the step ------------------------------------------------------------------------------------
    def context(self, step: int) -> dict[str, Any]:
        return {"input_hook": self._input_hook} if self.config.mode == "lite" else {}

    def _input_hook(self, layer_idx: int, hidden_BSD: Tensor, ctx: RoutingContext) -> Tensor:
        if not (torch.is_grad_enabled() and hidden_BSD.requires_grad) or ctx.modality_BT is None:
            return hidden_BSD
        image_BS = ctx.modality_BT == MODALITY_IMAGE
        return _ScaleGrad.apply(hidden_BSD, lambda: self._scale(image_BS))

    def _scale(self, image_BS: Tensor) -> Tensor | None:
        k_I, k_T = self.kappa["image"], self.kappa["text"]
        if k_I == 1.0 and k_T == 1.0:
            return None  # exactly the identity
        return torch.where(image_BS, k_I, k_T)

    def _mono_logits(self, model: nn.Module, inputs: dict[str, Any], zero_BS: Tensor) -> Tensor:
        """Logits of the model's forward with the input embeddings zeroed at ``zero_BS``."""
        with zeroed_embeddings(model, zero_BS), kept_block_contexts(model):
            return model(**inputs, routing_ctx=RoutingContext(records=[])).logits

    def before_backward(self, step_inputs: StepInputs, observer) -> dict[str, Tensor]:
        model, inputs = step_inputs.model, step_inputs.inputs
        self._check_checkpointing(model)
        image_token = getattr(getattr(model, "config", None), "image_token_id", None)
        if image_token is None or "labels" not in inputs:
            raise ValueError("agm needs a LLaVA-style model (config.image_token_id) and labelled batches.")
        ids_BS, labels_BS = inputs["input_ids"], inputs["labels"]
        mask_BS = inputs.get("attention_mask")
        real_BS = torch.ones_like(ids_BS, dtype=torch.bool) if mask_BS is None else mask_BS.bool()
        image_BS = (ids_BS == image_token) & real_BS
        if not bool(image_BS.any()):
            # a text-only batch of mixed data (LLaVA-665K's text rows, grouped by modality): one player only,
            # nothing to balance; the batch trains unmodulated, does not move the running means, and is
            # counted (agm/text_only_batch). Data without any image is refused in before_epoch.
            self.kappa = {"image": 1.0, "text": 1.0}
            self.last = {"agm/kappa_I": 1.0, "agm/kappa_T": 1.0, "agm/text_only_batch": 1.0}
            return {}
        text_BS = real_BS & ~image_BS & (labels_BS == IGNORE_INDEX)  # the instruction; answers kept
        full = step_inputs.output.logits
        faithful = self.config.mode == "faithful"
        with contextlib.nullcontext() if faithful else torch.no_grad():
            no_image = self._mono_logits(model, inputs, image_BS)
            no_text = self._mono_logits(model, inputs, text_BS)
        phi_I, phi_T = shapley(full if faithful else full.detach(), no_image, no_text)
        # scored on the samples that have both players (a text-only row of a mixed batch has no image one)
        scored_BS = labels_BS.masked_fill(~image_BS.any(1, keepdim=True), IGNORE_INDEX)
        s_I = float(answer_score(phi_I.detach(), scored_BS))
        s_T = float(answer_score(phi_T.detach(), scored_BS))
        c = self.config
        k_I, k_T = agm_kappa(s_I, s_T, self.sbar["image"], self.sbar["text"], c.alpha, c.cap)
        self.kappa = {"image": k_I, "text": k_T}
        self.batches += 1
        n = self.batches
        self.sbar = {
            "image": self.sbar["image"] * (n - 1) / n + s_I / n,
            "text": self.sbar["text"] * (n - 1) / n + s_T / n,
        }
        self.last = {
            "agm/text_only_batch": 0.0,
            "agm/kappa_I": k_I,
            "agm/kappa_T": k_T,
            "agm/s_I": s_I,
            "agm/s_T": s_T,
            "agm/sbar_I": self.sbar["image"],
            "agm/sbar_T": self.sbar["text"],
        }
        if not faithful:
            return {}
        out = _ScaleGrad.apply(phi_I, lambda: k_I) + _ScaleGrad.apply(phi_T, lambda: k_T)
        loss_fn = model.loss_function
        vocab = full.shape[-1]
        modulated = loss_fn(logits=out, labels=labels_BS, vocab_size=vocab)
        plain = loss_fn(logits=full, labels=labels_BS, vocab_size=vocab)
        return {"agm": modulated - plain}

    def coefficients(self, step: int) -> dict[str, float]:
        return {"agm": 1.0} if self.config.mode == "faithful" else {}

    def metrics(self, records, observer) -> dict[str, float]:
        return dict(self.last)

    # --- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"sbar_I": self.sbar["image"], "sbar_T": self.sbar["text"], "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.sbar = {"image": float(state["sbar_I"]), "text": float(state["sbar_T"])}
        self.batches = int(state["batches"])
