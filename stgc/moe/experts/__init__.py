"""Expert banks, one module each, registered by name (``model.moe.experts.name``; docs/extending.md)."""

from stgc.moe.experts import ffn, lora  # noqa: F401  (registration)
from stgc.moe.experts.base import EXPERT_BANKS, ExpertBank, build_experts, register_experts
from stgc.moe.experts.ffn import FFN_KINDS, FFNExperts

__all__ = ["EXPERT_BANKS", "FFN_KINDS", "ExpertBank", "FFNExperts", "build_experts", "register_experts"]
