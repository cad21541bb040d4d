"""STGC: the conflict elimination loss on tokens whose gradient conflicts with their expert
(docs/method.md). The token gradients, scores and masks are ``stgc.conflict``'s; this objective decides
when they are computed and how L_cel enters the step, in each of the three modes."""

from __future__ import annotations

from torch import Tensor

from stgc.config import MoEConfig
from stgc.conflict import ConflictObserver, reference_token_grads, two_pass_cel, two_pass_first_pass
from stgc.moe.dispatch import sort_assignments
from stgc.moe.record import GradObserver, RoutingContext, RoutingRecord, TokenGrads
from stgc.objectives.base import Objective, StepInputs, register_objective
from stgc.objectives.config import STGCConfig


@register_objective
class STGC(Objective):
    """beta * sum_layers L_cel (docs/method.md, "The conflict elimination loss").

    fused: the observer adds beta * dL_cel/dz to the router-logit gradient inside the backward (no term in
    the forward loss; L_cel is logged from the observer after the backward). two_pass: a first backward of
    the main loss finds the masks (``before_backward``), then L_cel from the kept logits is a term.
    reference: the paper's literal per-token gradients (torch.func on explicit bias copies), then as
    two_pass. The pair tested is the executed assignment (a dropped or null one has no expert gradient).
    """

    name = "stgc"
    config: STGCConfig

    def __init__(self, config: STGCConfig, moe: MoEConfig) -> None:
        super().__init__(config, moe)
        if config.mode == "reference" and moe.second_expert_sampling:
            raise ValueError(
                "stgc.mode='reference' re-runs the forward with per-token bias copies, which must route "
                "exactly as the main forward: turn off moe.second_expert_sampling (random 2nd expert) or use "
                "mode='two_pass'."
            )
        self.adds_gradient_in_backward = config.mode == "fused"

    def check(self, moe_layers: tuple[int, ...]) -> None:
        wanted = self.config.layers
        if wanted is not None and not set(wanted) <= set(moe_layers):
            raise ValueError(
                f"stgc.layers={list(wanted)} includes layers without a MoE block; the MoE layers are "
                f"{sorted(moe_layers)}."
            )

    def active(self, step: int) -> bool:
        return step >= self.config.start_step and self.config.beta > 0

    def coefficients(self, step: int) -> dict[str, float]:
        return {"cel": self.config.beta if self.active(step) else 0.0}

    def observer(self, step: int) -> ConflictObserver:
        c = self.config
        return ConflictObserver(
            score=c.score,
            tau=c.tau,
            loss_form=c.loss,
            # fused: the CEL gradient is added to the router's inside the backward, scaled by this step's
            # coefficient (the same ``coefficients`` the loss and the logs use)
            scale=self.coefficients(step)["cel"] if c.mode == "fused" else 0.0,
            apply_layers=c.layers,
            allreduce_mean=c.allreduce_mean,
        )

    def before_backward(self, step_inputs: StepInputs, observer: GradObserver | None) -> dict[str, Tensor]:
        if self.config.mode == "fused":
            return {}
        records = step_inputs.ctx.records
        if self.config.mode == "two_pass":
            two_pass_first_pass(step_inputs.main_loss, records, observer)
        else:
            self._reference_masks(step_inputs, observer)
        if step_inputs.coefficients["cel"] > 0:
            return {"cel": two_pass_cel(records, observer)}
        return {"cel": step_inputs.main_loss.new_zeros(())}

    def _reference_masks(self, s: StepInputs, obs: ConflictObserver) -> None:
        """The paper's literal procedure: torch.func gradients on per-token bias copies, then the masks.
        The main loss of the re-run forwards has the same forward terms as the step's (its
        ``main_loss``): L_lm plus every scaled routing term, with the step's coefficients."""
        records = s.ctx.records

        def main_loss(biases: dict[int, tuple[Tensor, Tensor]]) -> Tensor:
            return s.rerun(RoutingContext(records=[], injected_biases=biases))

        token_grads = reference_token_grads(s.model, main_loss, records)
        obs.active = True
        for r in records:
            g1_TKF, g2_TKD = token_grads[r.layer_idx]
            T, K = r.topk_idx_TK.shape
            # the rows the MoE block hands its observer: all T*K assignments by expert, padding, dropped
            # and null ones marked invalid
            expert_A, order_A, token_A, pos_TK = sort_assignments(r.topk_idx_TK)
            grads = TokenGrads(
                g1_AF=g1_TKF.reshape(T * K, -1)[order_A],
                g2_AD=g2_TKD.reshape(T * K, -1)[order_A],
                expert_A=expert_A,
                token_A=token_A,
                order_A=order_A,
                pos_TK=pos_TK,
                valid_TK=r.executed_TK(),
            )
            obs(r, grads)
        obs.active = False

    def metrics(self, records: list[RoutingRecord], observer: GradObserver | None) -> dict[str, float]:
        return {}
