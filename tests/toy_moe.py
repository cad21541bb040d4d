"""A toy MoE language model for the method, conflict and trainer tests (not collected by pytest).

embedding -> L residual MoE blocks (swiglu or gelu experts) -> linear head -> next-token cross-entropy.
It is a ``PreTrainedModel`` so that ``Trainer`` saves it with ``save_pretrained`` and a checkpoint folder
reloads with ``ToyMoEModel.from_pretrained``. Its forward takes ``routing_ctx=`` like the real model.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from stgc.config import MoEConfig
from stgc.moe import MoEBlock, RoutingContext, routing_context


class ToyMoEConfig(PretrainedConfig):
    model_type = "stgc_toy_moe"

    def __init__(
        self,
        vocab_size: int = 16,
        hidden_size: int = 12,
        intermediate_size: int = 10,
        num_layers: int = 2,
        ffn: str = "swiglu",
        moe: dict | None = None,
        **kwargs,
    ):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_layers, self.ffn = num_layers, ffn
        self.moe = MoEConfig.from_dict(moe).to_dict()
        super().__init__(**kwargs)


@dataclasses.dataclass
class ToyOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class ToyMoEModel(PreTrainedModel):
    config_class = ToyMoEConfig
    main_input_name = "input_ids"

    def __init__(self, config: ToyMoEConfig):
        super().__init__(config)
        moe = MoEConfig.from_dict(config.moe)
        D, F_ = config.hidden_size, config.intermediate_size
        self.embed_tokens = nn.Embedding(config.vocab_size, D)
        self.layers = nn.ModuleList(
            MoEBlock(moe, D, F_, config.ffn, layer_idx=i) for i in range(config.num_layers)
        )
        self.lm_head = nn.Linear(D, config.vocab_size)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:  # keep the modules' own initialisation
        pass

    def forward(
        self,
        input_ids,
        labels=None,
        attention_mask=None,
        routing_ctx: RoutingContext | None = None,
        modality=None,
        cluster_ids=None,
    ):
        """``modality`` (B, S) codes and ``cluster_ids`` (B,) go into the routing context, as the real
        model puts its image-token expansion and the collator's instruction clusters there."""
        ctx = routing_ctx if routing_ctx is not None else RoutingContext()
        if ctx.token_mask_BT is None and attention_mask is not None:
            ctx = dataclasses.replace(ctx, token_mask_BT=attention_mask.bool())
        if modality is not None and ctx.modality_BT is None:
            ctx = dataclasses.replace(ctx, modality_BT=modality)
        if cluster_ids is not None and ctx.cluster_B is None:
            ctx = dataclasses.replace(ctx, cluster_B=cluster_ids)
        with routing_context(self, ctx):
            h = self.embed_tokens(input_ids)
            for block in self.layers:
                h = h + block(h)
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return ToyOutput(loss=loss, logits=logits)


def toy_model(
    ffn: str = "swiglu",
    *,
    num_layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    vocab_size: int = 16,
    **moe,
) -> ToyMoEModel:
    torch.manual_seed(seed)
    cfg = ToyMoEConfig(vocab_size=vocab_size, num_layers=num_layers, ffn=ffn, moe=MoEConfig(**moe).to_dict())
    model = ToyMoEModel(cfg).to(dtype)
    return model


def toy_batch(batch: int = 3, seq: int = 8, vocab_size: int = 16, seed: int = 0, pad: int = 0) -> dict:
    """Random token ids; labels = input_ids (the model shifts); ``pad`` right-padded positions per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[:, -pad:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


class ToySequences(torch.utils.data.Dataset):
    """A learnable toy language: each row counts up modulo the vocabulary from a random start."""

    def __init__(self, n: int = 64, seq: int = 8, vocab_size: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab_size, (n, 1), generator=g)
        self.ids = (starts + torch.arange(seq)) % vocab_size

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())


def objectives(spec, moe: MoEConfig | None = None):
    """The ``ObjectiveSet`` of a method: a ``MethodConfig``, its dict form (either layout), or one objective's
    settings added to the baseline's ``load_balance``."""
    from stgc.objectives.config import LoadBalanceConfig, MethodConfig, ObjectiveConfig
    from stgc.objectives.set import ObjectiveSet

    if isinstance(spec, ObjectiveConfig):
        spec = MethodConfig(name=spec.name, objectives=(LoadBalanceConfig(), spec))
    return ObjectiveSet(spec, moe or MoEConfig())
