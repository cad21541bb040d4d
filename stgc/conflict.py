"""Token-level gradients, conflict scores and the conflict elimination loss (docs/method.md).

Shape legend: T tokens, E experts, K top-k, A routed (token, expert) assignments in expert-sorted order,
D model dim, F expert FFN dim, C conflicting assignments.

Token gradients are activation gradients (docs/method.md, "Token gradients"): for assignment (t, e)
  g2 = w_{t,e} * dL/dy_t                       (output bias, dim D)
  g1 = dL/d(first bias)                         (dim F): the real fc1 bias (GELU) or a virtual zero bias
                                                at the input of the down projection (SwiGLU): W_down^T g2.
The MoE block's backward hands them to a ``ConflictObserver`` (``stgc.moe.GradObserver``), which scores
every assignment against its expert's mean gradient, marks conflicts and, in the fused mode, adds
beta * dL_cel/dz to the router-logit gradient of the same backward.

Modes (docs/method.md, "Three ways to compute it"):
- ``fused``: one forward, one backward; the observer returns the scaled CEL gradient.
- ``two_pass``: forward; autograd.grad of the main loss down to the first MoE layer with the observer
  collecting masks (no weight gradients in that pass); L_cel from the kept logits; one backward of the total.
- ``reference``: the paper's literal procedure, torch.func gradients with respect to explicit per-token
  bias copies (``reference_token_grads``); slow, for tests and the benchmark.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from stgc.moe.dispatch import expert_membership
from stgc.moe.fused.passes import maybe_compiled
from stgc.moe.record import FirstPass, RoutingRecord, TokenGrads

SCORES = ("mean", "concat", "g1", "g2")
ZERO_NORM = 1e-20  # a gradient or mean at most this long is no direction: its pair is never considered
LOSS_FORMS = ("neg_logit_ce", "prob", "min_score")
MODES = ("fused", "two_pass", "reference")
HIST_BINS = 20  # score histogram over [-1, 1]


# --------------------------------------------------------------------------------------------------------
# scores and masks


def _rowstats(g_AX: Tensor, m_EX: Tensor, v_EX: Tensor | None, expert_A: Tensor):
    """(|g_a|^2, <g_a, m_e(a)>, <g_a, v_e(a)> or None) per row, accumulated in m's dtype: one pass over g
    (compiled on a large GPU tensor: the expert vectors are read by index inside the kernel)."""
    gf = g_AX.to(m_EX.dtype)
    sq, dot_m = (gf * gf).sum(-1), (gf * m_EX[expert_A]).sum(-1)
    return sq, dot_m, (None if v_EX is None else (gf * v_EX[expert_A]).sum(-1))


def conflict_scores(
    g1_AF: Tensor,
    g2_AD: Tensor,
    expert_A: Tensor,
    valid_A: Tensor | None,
    num_experts: int,
    *,
    score: str = "mean",
    zero_norm: float = ZERO_NORM,
    allreduce_mean: bool = False,
    sq1_A: Tensor | None = None,
    w_out_EDF: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Cosine score of each assignment's gradient with its expert's mean gradient.

    gbar_e = mean of g over the valid assignments of expert e (per micro-batch; with ``allreduce_mean`` the
    sums and counts are all-reduced over data-parallel ranks first).
    ``mean``: (cos(g1, gbar1) + cos(g2, gbar2)) / 2 (default); ``concat``: cos([g1; g2], [gbar1; gbar2]);
    ``g1`` / ``g2``: one cosine.
    Returns (score_A fp32 (fp64 for fp64 inputs), considered_A bool): an assignment is considered when it is
    valid (not padding, not dropped) and both its gradients and its expert's means have norm >
    ``zero_norm`` (a pair no loss reaches is never conflicting; an expert with no tokens has no mean).
    ``valid_A`` may be ``None`` (every row is a real, kept assignment).

    ``sq1_A`` (|g1|^2 per row) and ``w_out_EDF`` (SwiGLU: g1 = g2 @ W_out[e]) come from the MoE block's
    backward; with both, g1 is not read at all: sum_e g1 = (sum_e g2) W_out[e] and
    <g1_a, gbar1_e> = <g2_a, W_out[e] gbar1_e>, so one pass over g2 (dim D) replaces two over g1 (dim F).

    Cost: inputs stay in their dtype (bf16 on GPU; no full-size fp32 copies): per-expert sums are one skinny
    GEMM (fp32 accumulation inside, the E x X result rounded to the input dtype: ~1e-3 relative error of the
    means in bf16); norms and dot products accumulate in fp32 in one pass per tensor (``stgc bench stgc``).
    """
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not valid; choose one of {SCORES}.")
    acc = torch.promote_types(g2_AD.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs (tests)
    E = num_experts
    if w_out_EDF is not None and w_out_EDF.shape[0] < E:
        # a router wider than the bank (AdaMoE's null experts): null rows never run an expert, so they
        # are never valid (``valid_A``); index them as the last expert only to keep the gathers in range
        E = w_out_EDF.shape[0]
        assert valid_A is not None, "null-expert rows must be marked invalid"
        expert_A = expert_A.clamp_max(E - 1)
    member_EA = expert_membership(expert_A, E, valid_A, g2_AD.dtype)
    counts = member_EA.sum(1, dtype=acc)
    sums2 = (member_EA @ g2_AD).to(acc)
    linear = w_out_EDF is not None
    sums1 = None if linear else (member_EA.to(g1_AF.dtype) @ g1_AF).to(acc)
    if allreduce_mean and torch.distributed.is_available() and torch.distributed.is_initialized():
        for t_ in (sums2, counts) if linear else (sums1, sums2, counts):
            torch.distributed.all_reduce(t_)
    mean2 = sums2 / counts.clamp_min(1)[:, None]
    if linear:
        # gbar1_e = gbar2_e W_out[e]; v_e = W_out[e] gbar1_e gives <g1_a, gbar1_e> = <g2_a, v_e>
        w = w_out_EDF
        mean1 = torch.bmm(mean2.to(w.dtype)[:, None, :], w)[:, 0].to(acc)
        v_ED = torch.bmm(mean1.to(w.dtype)[:, None, :], w.transpose(1, 2))[:, 0].to(acc)
        if sq1_A is None:
            sq1_A = torch.linalg.vector_norm(g1_AF, dim=-1, dtype=acc).square()
        sq1 = sq1_A.to(acc)
        sq2, dot2, dot1 = maybe_compiled("rowstats_g2v", _rowstats, g2_AD)(g2_AD, mean2, v_ED, expert_A)
    else:
        mean1 = sums1 / counts.clamp_min(1)[:, None]
        sq1, dot1, _ = maybe_compiled("rowstats_g1", _rowstats, g1_AF)(g1_AF, mean1, None, expert_A)
        sq2, dot2, _ = maybe_compiled("rowstats_g2", _rowstats, g2_AD)(g2_AD, mean2, None, expert_A)
    mnorm1 = torch.linalg.vector_norm(mean1, dim=-1)
    mnorm2 = torch.linalg.vector_norm(mean2, dim=-1)
    s_A, considered = maybe_compiled("score_tail", _score_tail, g1_AF)(
        sq1, dot1, sq2, dot2, mnorm1, mnorm2, expert_A, zero_norm, score
    )
    if valid_A is not None:
        considered = considered & valid_A
    return s_A, considered


def _score_tail(
    sq1: Tensor,
    dot1: Tensor,
    sq2: Tensor,
    dot2: Tensor,
    mnorm1_E: Tensor,
    mnorm2_E: Tensor,
    expert_A: Tensor,
    zero_norm: float,
    score: str,
) -> tuple[Tensor, Tensor]:
    """Cosines from squared norms and dot products: ~20 elementwise ops on A-length vectors, compiled into
    one kernel when the layer is large (it is launch-bound, not bandwidth-bound)."""
    n1, n2 = sq1.sqrt(), sq2.sqrt()
    m1, m2 = mnorm1_E[expert_A], mnorm2_E[expert_A]
    considered = (n1 > zero_norm) & (n2 > zero_norm) & (m1 > zero_norm) & (m2 > zero_norm)
    cos1 = dot1 / (n1 * m1).clamp_min(zero_norm)
    cos2 = dot2 / (n2 * m2).clamp_min(zero_norm)
    if score == "mean":
        s_A = (cos1 + cos2) / 2
    elif score == "g1":
        s_A = cos1
    elif score == "g2":
        s_A = cos2
    else:
        denom = ((n1 * n1 + n2 * n2) * (m1 * m1 + m2 * m2)).sqrt()
        s_A = (dot1 + dot2) / denom.clamp_min(zero_norm)
    return s_A.clamp(-1.0, 1.0), considered


def _token_scores(
    record: RoutingRecord, grads: TokenGrads, obs: ConflictObserver, cel_scale: float | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """``conflict_scores`` (SwiGLU shortcut) and the conflict masks from the MoE block's Triton backward:
    the per-expert sums of g2 come from the pass that wrote g2 and the scores from one read of dy
    (``stgc.moe.fused.observer_kernels.conflict_tokens``); with ``cel_scale`` also the scaled neg_logit_ce
    gradient and L_cel.
    The scores are cosines, so the expert sums stand in for the means (same direction; an expert with no
    valid rows has sum 0 and no conflicts); with ``allreduce_mean`` the sums are summed over ranks."""
    from stgc.moe.fused.observer_kernels import conflict_tokens

    sums2 = grads.sums2_ED
    if obs.allreduce_mean and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums2)
    w = grads.w_out_EDF
    if w.dtype == torch.float16:  # sums of many fp16 rows can exceed its range: use the means there
        sums2 = sums2 / record.tokens_per_expert_E.clamp_min(1).to(sums2.dtype)[:, None]
    # gbar1_e ∝ sum2_e W_out[e]; v_e = W_out[e] gbar1_e gives <g1_a, gbar1_e> = <g2_a, v_e>
    sums1 = torch.bmm(sums2.to(w.dtype)[:, None, :], w)
    v_ED = torch.bmm(sums1, w.transpose(1, 2))[:, 0]
    return conflict_tokens(
        grads.dy_TD,
        sums2,
        v_ED,
        grads.sq1_A,
        record.topk_idx_TK,
        record.weights_TK,
        grads.pos_TK,
        grads.valid_TK,
        record.logits_TE,
        tau=obs.tau,
        zero_norm=ZERO_NORM,
        score=obs.score,
        cel_scale=cel_scale,
    )


# --------------------------------------------------------------------------------------------------------
# the conflict elimination loss


def cel_loss(logits_TE: Tensor, token_A: Tensor, expert_A: Tensor, conflict_A: Tensor, form: str) -> Tensor:
    """Conflict elimination loss of one layer (docs/method.md, "The conflict elimination loss"), a pure
    function of the router logits.

    ``neg_logit_ce`` (default): L = (1 / max(1, |C|)) sum_{(t,e) in C} -log softmax(-z_t)_e; its gradient
        per pair is (onehot_e - softmax(-z_t)) / |C|: it lowers the conflicting expert's logit and moves mass
        to the others.
    ``prob``: L = mean over C of p_{t,e} (softmax(z_t)_e).
    ``min_score``: L = mean over C of z_{t,e} (the raw router score).
    Padding never appears in C (``conflict_scores`` excludes invalid assignments). The mask is a constant.
    """
    if form not in LOSS_FORMS:
        raise ValueError(f"loss form {form!r} is not valid; choose one of {LOSS_FORMS}.")
    z_AE = logits_TE.index_select(0, token_A).float()
    if form == "neg_logit_ce":
        per_A = -torch.log_softmax(-z_AE, dim=-1).gather(1, expert_A[:, None])[:, 0]
    elif form == "prob":
        per_A = torch.softmax(z_AE, dim=-1).gather(1, expert_A[:, None])[:, 0]
    else:
        per_A = z_AE.gather(1, expert_A[:, None])[:, 0]
    w_A = conflict_A.to(per_A.dtype)
    return (per_A * w_A).sum() / w_A.sum().clamp_min(1.0)


def _cel_grad_neg_logit_ce(
    logits_TE: Tensor, token_A: Tensor, expert_A: Tensor, conflict_A: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """(scale * dL_cel/dz, L_cel) of the default form in closed form: per conflicting pair (t, e) the
    gradient is (onehot_e - softmax(-z_t)) / |C| (docs/method.md, "The conflict elimination loss"): no
    autograd graph per layer, and one compiled kernel when the layer is large; a test holds it equal to
    autograd on ``cel_loss``."""
    z_AE = logits_TE.index_select(0, token_A).float()
    logq_AE = torch.log_softmax(-z_AE, dim=-1)
    w_A = conflict_A.float()
    n = w_A.sum().clamp_min(1.0)
    # (F.one_hot validates its input on the device, which syncs the host: scatter does not)
    onehot_AE = torch.zeros_like(z_AE).scatter_(1, expert_A[:, None], 1.0)
    g_AE = (onehot_AE - logq_AE.exp()) * (w_A * (scale / n))[:, None]
    grad_TE = torch.zeros_like(logits_TE, dtype=torch.float32).index_add(0, token_A, g_AE)
    cel = -(logq_AE.gather(1, expert_A[:, None])[:, 0] * w_A).sum() / n
    return grad_TE, cel


# --------------------------------------------------------------------------------------------------------
# the observer


@dataclasses.dataclass
class LayerConflict:
    """One layer's conflict result for one backward (tensors stay on device until logged)."""

    layer_idx: int
    token_A: Tensor
    expert_A: Tensor
    score_A: Tensor
    considered_A: Tensor
    conflict_A: Tensor
    cel: Tensor  # unscaled L_cel of this layer (0 when not applied)
    num_experts: int

    def stats(self) -> dict[str, Tensor]:
        """fraction (conflicts / considered pairs), mean score (gradient consistency), histogram, counts."""
        considered = self.considered_A.float()
        n = considered.sum()
        conflicts = (self.conflict_A.float()).sum()
        zeros = torch.zeros(self.num_experts, device=n.device)
        return {
            "fraction": conflicts / n.clamp_min(1),
            "mean_cos": (self.score_A * considered).sum() / n.clamp_min(1),
            "pairs": n,
            "conflicts": conflicts,
            "cel": self.cel.detach(),
            # histc ignores values outside [min, max]: parking unconsidered pairs at 2 avoids a sync
            "hist": torch.histc(
                torch.where(self.considered_A, self.score_A, 2.0).float(), bins=HIST_BINS, min=-1.0, max=1.0
            ),
            "tokens_per_expert": zeros.index_add(0, self.expert_A, considered),
            "conflicts_per_expert": zeros.index_add(0, self.expert_A, self.conflict_A.float()),
        }


class ConflictObserver:
    """A ``stgc.moe.GradObserver`` computing conflict masks and (optionally) the fused CEL gradient.

    scale: beta of the fused mode (the CEL gradient is scaled here, the one place it is applied in that
        mode); 0 or ``apply_layers`` excluding a layer means measure only.
    loss_scale: the factor by which the caller multiplies the loss before its backward (the Trainer:
        1 / gradient-accumulation steps), or ``None`` when it is not known (fp16 loss scaling). The fused
        CEL gradient, which bypasses the loss, gets it too; two_pass's first pass uses it to compute the
        last MoE layer's backward once for both passes (``two_pass_first_pass``).
    first_pass: a ``stgc.moe.FirstPass`` during two_pass's first backward (``two_pass_first_pass``), else
        ``None``.
    reports_cel: False for an observer that only measures (a method without L_cel, on the trainer's
        measuring steps): its summary then has no ``cel`` keys rather than zeros.
    ``layers`` holds each layer's per-assignment result of the last backward (masks and scores, a few
    hundred KB per layer): the statistics and the two_pass loss are computed from it.
    """

    def __init__(
        self,
        *,
        score: str = "mean",
        tau: float = 0.0,
        loss_form: str = "neg_logit_ce",
        scale: float = 0.0,
        apply_layers: Iterable[int] | None = None,
        allreduce_mean: bool = False,
        collect_grads: bool = False,
        loss_scale: float | None = 1.0,
        reports_cel: bool = True,
    ):
        if score not in SCORES:
            raise ValueError(f"score={score!r} is not valid; choose one of {SCORES}.")
        if loss_form not in LOSS_FORMS:
            raise ValueError(f"loss form {loss_form!r} is not valid; choose one of {LOSS_FORMS}.")
        self.score, self.tau, self.loss_form, self.scale = score, tau, loss_form, scale
        self.apply_layers = None if apply_layers is None else set(apply_layers)
        self.allreduce_mean = allreduce_mean
        self.collect_grads = collect_grads
        self.loss_scale = loss_scale
        self.reports_cel = reports_cel
        self.active = True
        self.first_pass: FirstPass | None = None
        self.layers: dict[int, LayerConflict] = {}
        self._stats: dict[int, dict[str, Tensor]] = {}
        self.grads: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def _grad_scale(self) -> float:
        """The fused CEL gradient's factor: beta times the caller's loss scale."""
        return self.scale * (1.0 if self.loss_scale is None else self.loss_scale)

    def applies_to(self, layer_idx: int) -> bool:
        return self.scale != 0 and (self.apply_layers is None or layer_idx in self.apply_layers)

    def __call__(self, record: RoutingRecord, grads: TokenGrads) -> Tensor | None:
        if not self.active:
            return None
        E = record.num_experts
        token_A, expert_A = grads.token_A, grads.expert_A
        if self.collect_grads:
            self.grads[record.layer_idx] = (grads.g1_AF.detach(), grads.g2_AD.detach(), expert_A, token_A)
        applies = self.applies_to(record.layer_idx)
        grad_TE = cel = None
        if grads.dy_TD is not None and grads.sums2_ED is not None:
            # the Triton pass; with the default loss form it also gives the scaled gradient and L_cel
            in_kernel = applies and self.loss_form == "neg_logit_ce"
            score_A, considered_A, conflict_A, grad_TE, cel = _token_scores(
                record, grads, self, self._grad_scale() if in_kernel else None
            )
        else:
            score_A, considered_A = conflict_scores(
                grads.g1_AF,
                grads.g2_AD,
                expert_A,
                grads.rows_valid(),
                E,
                score=self.score,
                allreduce_mean=self.allreduce_mean,
                sq1_A=grads.sq1_A,
                w_out_EDF=grads.w_out_EDF,
            )
            conflict_A = considered_A & (score_A < self.tau)
        if cel is None:
            cel = torch.zeros((), device=score_A.device)
        if applies and grad_TE is None:
            if self.loss_form == "neg_logit_ce":
                grad_TE, cel = maybe_compiled("cel_grad", _cel_grad_neg_logit_ce, grads.g1_AF)(
                    record.logits_TE.detach(), token_A, expert_A, conflict_A, self._grad_scale()
                )
            else:
                with torch.enable_grad():
                    z_TE = record.logits_TE.detach().requires_grad_(True)
                    cel = cel_loss(z_TE, token_A, expert_A, conflict_A, self.loss_form)
                    (grad_TE,) = torch.autograd.grad(cel * self._grad_scale(), z_TE)
            grad_TE = grad_TE.to(record.logits_TE.dtype)
        # Statistics are computed when read (``stats`` / ``summary``), not in the backward's hot path.
        self.layers[record.layer_idx] = LayerConflict(
            record.layer_idx, token_A, expert_A, score_A, considered_A, conflict_A, cel.detach(), E
        )
        self._stats.pop(record.layer_idx, None)
        return grad_TE

    @property
    def stats(self) -> dict[int, dict[str, Tensor]]:
        """Per-layer statistics (``LayerConflict.stats``) of the last backward, computed on first read."""
        for layer, lc in self.layers.items():
            if layer not in self._stats:
                self._stats[layer] = lc.stats()
        return self._stats

    def summary(self) -> dict[str, float]:
        """Flat float metrics for logging: conflict/layer{i}/{fraction,mean_cos,cel,pairs} and their means
        over layers (conflict/fraction, conflict/mean_cos)."""
        out: dict[str, float] = {}
        if not self.stats:
            return out
        fr, mc = [], []
        for layer, s in sorted(self.stats.items()):
            keys = (
                ("fraction", "mean_cos", "cel", "pairs")
                if self.reports_cel
                else ("fraction", "mean_cos", "pairs")
            )
            for key in keys:
                out[f"conflict/layer{layer}/{key}"] = float(s[key].detach())
            fr.append(out[f"conflict/layer{layer}/fraction"])
            mc.append(out[f"conflict/layer{layer}/mean_cos"])
        out["conflict/fraction"] = sum(fr) / len(fr)
        out["conflict/mean_cos"] = sum(mc) / len(mc)
        return out


# --------------------------------------------------------------------------------------------------------
# the two_pass and reference modes


def two_pass_first_pass(main_loss: Tensor, records: list[RoutingRecord], observer: ConflictObserver) -> None:
    """Backward of the main loss down to the first MoE layer's router logits with the observer collecting
    token gradients and masks; the graph is kept for the real backward.

    What the masks need and no more: no weight gradients, and no input gradient in the first MoE layer
    (nothing below its router needs one), except in the last MoE layer. The gradient at that layer's output
    is the same in the second backward (every L_cel is a function of router logits, which sit at or below
    it), so its whole backward runs here, from ``main_loss * observer.loss_scale`` (the loss as the caller
    will back-propagate it), and the second backward reuses it (``stgc.moe.fused.experts_fn.ExpertsFn``).
    With an unknown loss scale (``loss_scale=None``: fp16 loss scaling) the second backward computes it
    again."""
    if not records:
        raise ValueError("two_pass needs routing records: run the forward with a RoutingContext(records=[]).")
    observer.active = True
    keep = None if observer.loss_scale is None else records[-1].layer_idx
    observer.first_pass = FirstPass(stop_layer=records[0].layer_idx, keep_layer=keep)
    saved_scale = observer.scale
    observer.scale = 0.0  # the first pass only measures; L_cel is added as a forward term below
    loss = main_loss if observer.loss_scale in (None, 1.0) else main_loss * observer.loss_scale
    try:
        torch.autograd.grad(loss, [records[0].logits_TE], retain_graph=True, allow_unused=True)
    finally:
        observer.scale = saved_scale
        observer.first_pass = None
        observer.active = False  # the total's backward must not measure again


def two_pass_cel(records: list[RoutingRecord], observer: ConflictObserver) -> Tensor:
    """Sum over the applied layers of L_cel from the kept (differentiable) router logits and the masks."""
    total = records[0].logits_TE.new_zeros(())
    for r in records:
        layer = observer.layers.get(r.layer_idx)
        if layer is None or not (observer.apply_layers is None or r.layer_idx in observer.apply_layers):
            continue
        cel = cel_loss(r.logits_TE, layer.token_A, layer.expert_A, layer.conflict_A, observer.loss_form)
        layer.cel = cel.detach()
        observer._stats.pop(r.layer_idx, None)
        total = total + cel
    return total


def reference_token_grads(
    model: torch.nn.Module,
    loss_fn: Callable[[dict[int, tuple[Tensor, Tensor]]], Tensor],
    records: list[RoutingRecord],
) -> dict[int, tuple[Tensor, Tensor]]:
    """The paper's procedure: per-token copies of the experts' first and output biases (zero-valued),
    gradients with torch.func. Returns {layer_idx: (g1_TKF, g2_TKD)} in (token, top-k slot) layout.

    ``loss_fn(biases)`` must run the model's forward with ``RoutingContext(injected_biases=biases, ...)``
    and return the main loss (L_lm + alpha L_aux). ``records`` (from an earlier forward) give the shapes:
    T tokens, K slots.
    Routing must be deterministic (evaluation-style routing or fixed inputs), so that the copies line up.
    """
    from stgc.moe import MoEBlock

    blocks = {m.layer_idx: m for m in model.modules() if isinstance(m, MoEBlock)}
    biases = {}
    for r in records:
        bank = blocks[r.layer_idx].experts
        T, K = r.topk_idx_TK.shape
        weight = next(bank.parameters())  # (any bank: the experts' dtype and device)
        biases[r.layer_idx] = (
            torch.zeros(T, K, bank.intermediate_size, dtype=weight.dtype, device=weight.device),
            torch.zeros(T, K, bank.hidden_size, dtype=weight.dtype, device=weight.device),
        )

    grads = torch.func.grad(loss_fn)(biases)
    return {k: (v[0], v[1]) for k, v in grads.items()}
