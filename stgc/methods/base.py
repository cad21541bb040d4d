"""The routing-method registry (STYLE.md 1, BASELINES.md).

A method is a small class with pure loss functions of the routing records. ``train_loss`` is the one
place where coefficients are applied:

    ctx = RoutingContext(records=[], observer=method.observer(step))
    out = model(**batch, routing_ctx=ctx)
    terms = method.loss_terms(ctx.records, step)          # unscaled, differentiable
    loss = out.loss + sum(method.coefficients(step)[k] * terms[k] for k in terms)

(STGC's fused mode is the one exception the method cannot avoid: its beta scales the CEL gradient inside
the backward, in ``ConflictObserver``.)

Methods that need token-level gradients (STGC) return a ``GradObserver`` from ``observer``: it runs inside
each MoE layer's backward (see ``stgc.moe``). Peer methods (BASELINES.md) fit the same shape: CompeteSMoE
and AdaMoE change routing through their config and add terms; RoMA / AGM add terms or observers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import Tensor, nn

from stgc.config import ConfigBase, MoEConfig
from stgc.moe import GradObserver, RoutingContext, RoutingRecord


@dataclasses.dataclass
class StepLoss:
    """The result of one training forward: the loss to back-propagate and what to log.

    terms are unscaled; ``logs()`` gives each term scaled and unscaled (STYLE.md 3). ``observer`` holds the
    token-gradient statistics once the backward has run (fused mode) or already (two_pass / reference).
    """

    loss: Tensor
    lm_loss: Tensor
    terms: dict[str, Tensor]
    coefficients: dict[str, float]
    records: list[RoutingRecord]
    observer: GradObserver | None
    output: Any = None

    def logs(self) -> dict[str, float]:
        out = {"loss/total": float(self.loss.detach()), "loss/lm": float(self.lm_loss.detach())}
        for k, v in self.terms.items():
            out[f"loss/{k}"] = float(v.detach())
            out[f"loss/{k}_scaled"] = self.coefficients.get(k, 0.0) * float(v.detach())
        summary = getattr(self.observer, "summary", None)
        if summary is not None:
            conflict = summary()
            out.update(conflict)
            # fused: L_cel was computed inside the backward; log it like every other term
            if "cel" not in self.terms and conflict:
                cel = sum(v for k, v in conflict.items() if k.endswith("/cel"))
                out["loss/cel"] = cel
                out["loss/cel_scaled"] = getattr(self.observer, "scale", 0.0) * cel
                # the same total in every mode: L_lm + alpha L_aux + beta L_cel
                out["loss/total"] += out["loss/cel_scaled"]
        return out


@dataclasses.dataclass(frozen=True)
class MethodConfig(ConfigBase):
    """Base of every method's config; ``name`` selects the class in the registry."""

    name: str = "baseline"


class RoutingMethod:
    """Base class. Subclasses set ``name`` and ``Config`` and override what they change."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig, moe: MoEConfig):
        self.config, self.moe = config, moe

    def loss_terms(self, records: list[RoutingRecord], step: int) -> dict[str, Tensor]:
        """Unscaled regulariser terms, each summed over the MoE layers.

        The load-balancing loss of every method: L_aux = sum_layers E * sum_e f_e P_e (DeepSpeed's form,
        padding excluded; ``stgc.moe.route``). An empty record list is an error, not a silent zero
        (STYLE.md 12): the model was run without routing capture.
        """
        if not records:
            raise ValueError(
                "no routing records were captured in this forward: pass a RoutingContext with records=[] "
                "(the training loop does) — otherwise the regularisers would silently be zero."
            )
        return {"aux": sum(r.aux_loss for r in records)}

    def coefficients(self, step: int) -> dict[str, float]:
        return {"aux": self.moe.aux_loss_coef}

    def observer(self, step: int) -> GradObserver | None:
        """A gradient observer for this step's backward, or ``None`` (no token gradients needed)."""
        return None

    def train_loss(
        self, model: nn.Module, inputs: dict[str, Any], step: int, observer: GradObserver | None = None
    ) -> StepLoss:
        """Forward ``model`` on ``inputs`` and build the total loss. ``observer`` overrides the method's own
        (the trainer passes a measuring observer on logging steps of methods that need none). A caller that
        scales the returned loss before its backward (gradient accumulation) must tell the observer the
        factor (``ConflictObserver.loss_scale``, as ``stgc.train.MoETrainer`` does): STGC's fused CEL
        gradient bypasses the loss, and two_pass reuses a backward computed from the scaled loss."""
        obs = observer if observer is not None else self.observer(step)
        ctx = RoutingContext(records=[], observer=obs)
        out = model(**inputs, routing_ctx=ctx)
        terms = self.loss_terms(ctx.records, step)
        return self.combine(out, terms, self.coefficients(step), obs, ctx.records)

    @staticmethod
    def combine(out: Any, terms: dict[str, Tensor], coefs: dict[str, float], obs, records) -> StepLoss:
        missing = set(terms) - set(coefs)
        assert not missing, f"loss terms without a coefficient: {missing}"
        loss = out.loss + sum(coefs[k] * terms[k] for k in terms)
        return StepLoss(loss, out.loss, terms, coefs, records, obs, out)

    def to_dict(self) -> dict[str, Any]:
        return self.config.to_dict()


REGISTRY: dict[str, type[RoutingMethod]] = {}


def register(cls: type[RoutingMethod]) -> type[RoutingMethod]:
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    REGISTRY[cls.name] = cls
    return cls


def method_config_from_dict(data: dict[str, Any] | None) -> MethodConfig:
    data = dict(data or {"name": "baseline"})
    name = data.get("name", "baseline")
    if name not in REGISTRY:
        raise ValueError(f"unknown routing method {name!r}; valid methods are {sorted(REGISTRY)}.")
    return REGISTRY[name].Config.from_dict(data)


def build_method(config: MethodConfig | dict[str, Any], moe: MoEConfig) -> RoutingMethod:
    """The method object for a config (or its dict form, as stored in a checkpoint's config.json)."""
    if isinstance(config, dict):
        config = method_config_from_dict(config)
    return REGISTRY[config.name](config, moe)
