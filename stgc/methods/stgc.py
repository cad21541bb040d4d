"""STGC: the conflict elimination loss on tokens whose gradient conflicts with their expert (STGC.md)."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from stgc.conflict import LOSS_FORMS, MODES, SCORES, ConflictObserver, two_pass_cel, two_pass_first_pass
from stgc.methods.base import MethodConfig, RoutingMethod, StepLoss, register
from stgc.moe import RoutingContext


@dataclasses.dataclass(frozen=True)
class STGCConfig(MethodConfig):
    """beta: weight of L_cel (STGC.md section 4; the paper's value is unknown, 0.01 is ours: sweep it).
    tau: a (token, expert) pair conflicts when its score < tau (default 0).
    score: mean | concat | g1 | g2 (STGC.md section 3). loss: neg_logit_ce | prob | min_score.
    layers: decoder-layer indices of the MoE layers L_cel applies to (None: every MoE layer).
    start_step: first optimizer step with L_cel. mode: fused | two_pass | reference (STGC.md section 5).
    allreduce_mean: expert mean gradients over data-parallel ranks instead of per micro-batch.
    """

    name: str = "stgc"
    beta: float = 0.01
    tau: float = 0.0
    score: str = "mean"
    loss: str = "neg_logit_ce"
    layers: tuple[int, ...] | None = None
    start_step: int = 0
    mode: str = "fused"
    allreduce_mean: bool = False

    def __post_init__(self) -> None:
        if self.layers is not None and not isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"stgc.tau={self.tau} is outside [-1, 1] (it thresholds a cosine); use -1..1.")
        if self.beta < 0:
            raise ValueError(f"stgc.beta={self.beta} is negative; use beta >= 0 (0 turns the loss off).")
        if self.score not in SCORES:
            raise ValueError(f"stgc.score={self.score!r} is not valid; choose one of {SCORES}.")
        if self.loss not in LOSS_FORMS:
            raise ValueError(f"stgc.loss={self.loss!r} is not valid; choose one of {LOSS_FORMS}.")
        if self.mode not in MODES:
            raise ValueError(f"stgc.mode={self.mode!r} is not valid; choose one of {MODES}.")
        if self.start_step < 0:
            raise ValueError(f"stgc.start_step={self.start_step} is negative; use a step >= 0.")


@register
class STGC(RoutingMethod):
    """L = L_lm + alpha * sum L_aux + beta * sum_layers L_cel (STGC.md section 4)."""

    name = "stgc"
    Config = STGCConfig
    config: STGCConfig

    def __init__(self, config: STGCConfig, moe) -> None:
        super().__init__(config, moe)
        if config.mode == "reference" and moe.second_expert_sampling:
            raise ValueError(
                "stgc.mode='reference' re-runs the forward with per-token bias copies, which must route "
                "exactly as the main forward: turn off moe.second_expert_sampling (random 2nd expert) or use "
                "mode='two_pass'."
            )

    def active(self, step: int) -> bool:
        return step >= self.config.start_step and self.config.beta > 0

    def observer(self, step: int) -> ConflictObserver:
        c = self.config
        fused = c.mode == "fused"
        return ConflictObserver(
            score=c.score,
            tau=c.tau,
            loss_form=c.loss,
            # fused: beta is applied here, inside the backward (the CEL gradient is added to the router's)
            scale=c.beta if (fused and self.active(step)) else 0.0,
            apply_layers=c.layers,
            allreduce_mean=c.allreduce_mean,
        )

    def coefficients(self, step: int) -> dict[str, float]:
        coefs = super().coefficients(step)
        if self.config.mode != "fused":
            coefs["cel"] = self.config.beta if self.active(step) else 0.0
        return coefs

    def train_loss(self, model, inputs, step: int, observer=None) -> StepLoss:
        if self.config.mode == "fused":
            # an observer passed in is this method's own, given the loss scale by the trainer
            return super().train_loss(model, inputs, step, observer=observer)
        obs = observer if observer is not None else self.observer(step)
        ctx = RoutingContext(records=[], observer=obs)
        out = model(**inputs, routing_ctx=ctx)
        terms = super().loss_terms(ctx.records, step)
        coefs = self.coefficients(step)
        main = out.loss + coefs["aux"] * terms["aux"]
        if self.config.mode == "two_pass":
            two_pass_first_pass(main, ctx.records, obs)
        else:
            self._reference_masks(model, inputs, ctx, obs, step)
        terms["cel"] = two_pass_cel(ctx.records, obs) if coefs["cel"] > 0 else main.new_zeros(())
        return self.combine(out, terms, coefs, obs, ctx.records)

    def _reference_masks(self, model, inputs, ctx: RoutingContext, obs: ConflictObserver, step: int) -> None:
        """The paper's literal procedure: torch.func gradients on per-token bias copies, then the masks."""
        from stgc.conflict import reference_token_grads
        from stgc.moe import TokenGrads, sort_assignments

        records = ctx.records
        alpha = self.coefficients(step)["aux"]

        def main_loss(biases: dict[int, tuple[Tensor, Tensor]]) -> Tensor:
            c = RoutingContext(records=[], injected_biases=biases)
            o = model(**inputs, routing_ctx=c)
            return o.loss + alpha * sum(r.aux_loss for r in c.records)

        token_grads = reference_token_grads(model, main_loss, records)
        obs.active = True
        for r in records:
            g1_TKF, g2_TKD = token_grads[r.layer_idx]
            T, K = r.topk_idx_TK.shape
            # the rows the MoE block hands its observer: all T*K assignments by expert, padding and dropped
            # ones marked invalid
            expert_A, order_A, token_A, pos_TK = sort_assignments(r.topk_idx_TK)
            grads = TokenGrads(
                g1_AF=g1_TKF.reshape(T * K, -1)[order_A],
                g2_AD=g2_TKD.reshape(T * K, -1)[order_A],
                expert_A=expert_A,
                token_A=token_A,
                order_A=order_A,
                pos_TK=pos_TK,
                valid_TK=r.kept_TK & r.token_mask_T[:, None],
            )
            obs(r, grads)
        obs.active = False
