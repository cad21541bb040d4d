"""The expert-bank protocol: a module holding E experts that runs a ``RoutingRecord``'s assignments and,
when an observer is attached, hands it the token-level gradients (``TokenGrads``) inside the backward."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from stgc.config import MoEConfig
from stgc.moe.record import GradObserver, RoutingRecord


class ExpertBank(nn.Module):
    """Base class of every expert bank. Subclasses set ``name`` (the key of ``model.moe.experts.name``).

    ``forward(x_TD, record, observer, biases) -> y_TD``: y_t = sum over t's executed assignments (t, k) of
    weights_TK[t, k] * expert_{topk[t, k]}(x_t). With an ``observer`` the bank calls it once in the backward
    with the layer's record and ``TokenGrads`` and adds what it returns to the router logits' gradient.
    ``biases``: explicit per-(token, slot) first and output biases (STGC's `reference` mode).
    ``dense(x_TD) -> DenseOutputs``: every expert on every token (a competition step).
    ``ffn``: the FFN kind ("swiglu" / "gelu"), which defines where the first bias sits.
    ``parameter_group(name)``: which training group each parameter belongs to
    (``stgc.trainer.parameter_groups``).
    """

    name: ClassVar[str] = ""
    ffn: str
    num_experts: int
    hidden_size: int
    intermediate_size: int

    def forward(
        self,
        x_TD: Tensor,
        record: RoutingRecord,
        observer: GradObserver | None = None,
        biases: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def parameter_group(self, name: str) -> str:
        """The training group (``stgc.recipes.PARAM_GROUPS``) of the bank's parameter ``name``: "experts"
        for every parameter of a bank of full experts; a bank that keeps a frozen dense FFN (LoRA experts)
        puts it in "mlp", so that ``training.trainable`` leaves it frozen."""
        return "experts"


EXPERT_BANKS: dict[str, type[ExpertBank]] = {}


def register_experts(cls: type[ExpertBank]) -> type[ExpertBank]:
    """Class decorator: register a bank under ``cls.name`` (its settings class must be registered in
    ``stgc.config`` with ``register_experts_config`` under the same name)."""
    if not cls.name or cls.name in EXPERT_BANKS:
        raise ValueError(f"expert bank name {cls.name!r} is empty or registered twice")
    EXPERT_BANKS[cls.name] = cls
    return cls


def build_experts(moe: MoEConfig, hidden_size: int, intermediate_size: int, ffn: str) -> ExpertBank:
    name = moe.experts.name
    if name not in EXPERT_BANKS:
        raise ValueError(
            f"moe.experts.name={name!r} has no expert bank class; valid banks are {sorted(EXPERT_BANKS)}."
        )
    return EXPERT_BANKS[name](moe, hidden_size, intermediate_size, ffn)
