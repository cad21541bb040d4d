"""A run's objectives together (``ObjectiveSet``): the routing context of a step, the total loss with every
coefficient applied in one place (``scaled_sum``), the logs, and the state saved with checkpoints. The
trainer (``stgc.trainer.MoETrainer``) uses only this; it has no branch for any one method."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from stgc.config import MoEConfig
from stgc.moe.record import GradObserver, RoutingContext, RoutingRecord

# the built-in objectives register (competesmoe, peers: peer routing methods I)
from stgc.objectives import agm, competesmoe, load_balance, mole_balance, peers, roma, stgc, z_loss  # noqa: F401
from stgc.objectives.base import OBJECTIVES, Objective, StepInputs, TrainingData
from stgc.objectives.config import MethodConfig, ObjectiveConfig

STATE_NAME = "objectives_state.pt"  # in every checkpoint folder of a run with stateful objectives


def scaled_sum(base: Tensor, terms: dict[str, Tensor], coefficients: dict[str, float]) -> Tensor:
    """base + sum_k coefficients[k] * terms[k]: the one place where coefficients multiply loss terms."""
    missing = sorted(set(terms) - set(coefficients))
    if missing:
        raise ValueError(f"loss terms {missing} have no coefficient; their objective must give one.")
    return base + sum(coefficients[k] * terms[k] for k in terms)


@dataclasses.dataclass
class StepLoss:
    """One training forward: the loss to back-propagate and what to log.

    terms are unscaled; ``logs()`` gives each term scaled and unscaled. ``observer`` holds the
    token-gradient statistics once the backward has run (fused mode) or already (two_pass / reference).
    ``in_backward``: the scaled terms added inside the backward (STGC fused: its CEL gradient), known once
    the backward has run; they are part of ``loss/total``.
    """

    loss: Tensor
    lm_loss: Tensor
    terms: dict[str, Tensor]
    coefficients: dict[str, float]
    records: list[RoutingRecord]
    observer: GradObserver | None
    output: Any = None

    def in_backward(self) -> dict[str, float]:
        """{term: unscaled value} of the terms an observer applied inside the backward (fused L_cel)."""
        summary = getattr(self.observer, "summary", None)
        if summary is None or "cel" in self.terms or not getattr(self.observer, "reports_cel", False):
            return {}
        cel = [v for k, v in summary().items() if k.endswith("/cel")]
        return {"cel": sum(cel)} if cel else {}

    def logs(self) -> dict[str, float]:
        out = {"loss/total": float(self.loss.detach()), "loss/lm": float(self.lm_loss.detach())}
        values = {k: float(v.detach()) for k, v in self.terms.items()}
        values.update(self.in_backward())
        for k, v in values.items():
            out[f"loss/{k}"] = v
            out[f"loss/{k}_scaled"] = self.coefficients.get(k, 0.0) * v
            if k not in self.terms:
                out["loss/total"] += out[f"loss/{k}_scaled"]  # the same total in every mode
        summary = getattr(self.observer, "summary", None)
        if summary is not None:
            out.update(summary())
        return out


class ObjectiveSet:
    """The objectives of a run (``MethodConfig.objectives``), built against the model's MoE settings."""

    def __init__(self, method: MethodConfig | dict[str, Any] | Sequence[ObjectiveConfig], moe: MoEConfig):
        if isinstance(method, dict):
            method = MethodConfig.from_dict(method)
        configs = method.objectives if isinstance(method, MethodConfig) else tuple(method)
        unknown = [c.name for c in configs if c.name not in OBJECTIVES]
        if unknown:
            raise ValueError(
                f"objectives {unknown} have no implementation; valid ones are {sorted(OBJECTIVES)}."
            )
        self.items: list[Objective] = [OBJECTIVES[c.name](c, moe) for c in configs]
        watchers = [o.name for o in self.items if o.observer(0) is not None]
        if len(watchers) > 1:
            raise ValueError(
                f"method.objectives {watchers} each need the token-gradient observer, and a backward has "
                "one; keep one of them."
            )
        self.moe = moe

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.items]

    def check(self, moe_layers: tuple[int, ...]) -> None:
        for o in self.items:
            o.check(moe_layers)

    def prepare(self, *, max_steps: int, moe_layers: tuple[int, ...], seed: int) -> None:
        for o in self.items:
            o.prepare(max_steps=max_steps, moe_layers=moe_layers, seed=seed)

    def before_epoch(self, epoch: int, data: TrainingData) -> None:
        for o in self.items:
            o.before_epoch(epoch, data)

    def synthetic_setup(self, model: nn.Module, inputs: dict[str, Any]) -> None:
        for o in self.items:
            o.synthetic_setup(model, inputs)

    def observer(self, step: int) -> GradObserver | None:
        return next((obs for obs in (o.observer(step) for o in self.items) if obs is not None), None)

    @property
    def adds_gradient_in_backward(self) -> bool:
        return any(o.adds_gradient_in_backward for o in self.items)

    def routing_context(self, step: int, observer: GradObserver | None) -> RoutingContext:
        fields: dict[str, Any] = {}
        for o in self.items:
            extra = o.context(step)
            clash = sorted(set(extra) & set(fields))
            if clash:
                raise ValueError(f"objectives {self.names} both set routing context fields {clash}.")
            fields.update(extra)
        return RoutingContext(records=[], observer=observer, **fields)

    def forward_terms(
        self, records: list[RoutingRecord], step: int
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Every objective's forward terms and the coefficients of all terms at ``step``."""
        if not records:
            raise ValueError(
                "no routing records were captured in this forward: pass a RoutingContext with records=[] "
                "(the training loop does) — otherwise the regularisers would silently be zero."
            )
        terms: dict[str, Tensor] = {}
        coefs: dict[str, float] = {}
        for o in self.items:
            for part, what in ((o.terms(records, step), terms), (o.coefficients(step), coefs)):
                clash = sorted(set(part) & set(what))
                if clash:
                    raise ValueError(f"objective {o.name!r} repeats the loss terms {clash} of another one.")
                what.update(part)
        return terms, coefs

    def step_loss(
        self, model: nn.Module, inputs: dict[str, Any], step: int, observer: Any = "own"
    ) -> StepLoss:
        """Forward ``model`` on ``inputs`` and build the total loss. ``observer``: the objectives' own for
        this step by default; the trainer may pass another (a measuring one, or its own with the loss
        scale set: an observer that adds a gradient inside the backward must know how the caller scales
        the loss before its backward, ``ConflictObserver.loss_scale``)."""
        if observer == "own":
            observer = self.observer(step)
        ctx = self.routing_context(step, observer)
        out = model(**inputs, routing_ctx=ctx)
        terms, coefs = self.forward_terms(ctx.records, step)
        main = scaled_sum(out.loss, terms, coefs)

        def rerun(other: RoutingContext) -> Tensor:
            o = model(**inputs, routing_ctx=other)
            t, c = self.forward_terms(other.records, step)
            return scaled_sum(o.loss, t, c)

        late: dict[str, Tensor] = {}
        step_inputs = StepInputs(model, ctx, out, main, step, coefs, rerun, inputs)
        for o in self.items:
            late.update(o.before_backward(step_inputs, observer))
        loss = scaled_sum(main, late, coefs)
        return StepLoss(loss, out.loss, {**terms, **late}, coefs, ctx.records, observer, out)

    def metrics(self, result: StepLoss) -> dict[str, float]:
        out: dict[str, float] = {}
        for o in self.items:
            out.update(o.metrics(result.records, result.observer))
        return out

    def after_step(self, step: int) -> None:
        for o in self.items:
            o.after_step(step)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {o.name: s for o in self.items if (s := o.state_dict())}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        unknown = sorted(set(state) - set(self.names))
        if unknown:
            raise ValueError(f"checkpoint holds state of objectives {unknown}, which this run does not have.")
        for o in self.items:
            o.load_state_dict(state.get(o.name, {}))
