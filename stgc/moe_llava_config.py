"""The config of the MoE-LLaVA model (``MoELlavaConfig``, model_type ``stgc_moe_llava``): a transformers
``LlavaConfig`` plus the MoE settings and the routing method, validated when built; the model itself is in
``stgc.modeling`` (transformers' configuration / modeling split), which also re-exports this class."""

from __future__ import annotations

from typing import Any

from transformers import LlavaConfig

from stgc.backbones import backbone_for_text_config
from stgc.config import MoEConfig


class MoELlavaConfig(LlavaConfig):
    """A ``LlavaConfig`` plus the MoE settings and the routing method.

    moe: ``MoEConfig.to_dict()`` (validated here, also against the text config's layer count).
    routing_method: a plain dict naming the routing method and its objectives (``MethodConfig.to_dict()``,
        e.g. ``{"name": "stgc", "objectives": [...]}``; older checkpoints hold the flat
        ``{"name": "stgc", "beta": ...}``); stored and round-tripped as is, for provenance (evaluation
        routes by the MoE config alone).
    """

    model_type = "stgc_moe_llava"

    moe: dict | None = None
    routing_method: dict | None = None

    def __post_init__(self, **kwargs):
        self.moe = json_form(MoEConfig.from_dict(self.moe).to_dict())
        self.routing_method = dict(self.routing_method) if self.routing_method else {"name": "baseline"}
        if "name" not in self.routing_method:
            raise ValueError(
                f"routing_method={self.routing_method!r} has no 'name'; give e.g. {{'name': 'baseline'}}."
            )
        super().__post_init__(**kwargs)
        # Fail at construction, not at the first forward: unknown backbone or MoE layer out of range.
        backbone_for_text_config(self.text_config)
        self.moe_config.resolve_layers(self.text_config.num_hidden_layers)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save, with an ``auto_map`` to a loader module written next to config.json, so that loading
        without ``import stgc`` says what to import (``stgc.autoload``)."""
        from stgc.autoload import AUTO_MAP, write_module

        self.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        write_module(save_directory)

    @property
    def moe_config(self) -> MoEConfig:
        return MoEConfig.from_dict(self.moe)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Decoder-layer indices whose MLP is a MoE block."""
        return self.moe_config.resolve_layers(self.text_config.num_hidden_layers)

    @classmethod
    def from_llava_config(
        cls, llava_config: LlavaConfig, moe: MoEConfig, routing_method: dict | None = None
    ) -> MoELlavaConfig:
        """The MoE config of a dense LLaVA config (every other field copied)."""
        data = llava_config.to_dict()
        for key in ("model_type", "architectures", "moe", "routing_method"):
            data.pop(key, None)
        return cls(**data, moe=moe.to_dict(), routing_method=routing_method)


def json_form(value: Any) -> Any:
    """Tuples as lists, recursively (what config.json holds; the config classes turn lists back)."""
    if isinstance(value, dict):
        return {k: json_form(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [json_form(v) for v in value]
    return value
