"""LLaVA-MoLE's expert bank: the dense FFN frozen, each expert a LoRA delta on every one of its projections
(Chen et al. 2024, "LLaVA-MoLE"; released inference code forwchen/LLaVA-MoLE, ``moe.py``), and its eager
forward, the readable specification (there is no fused path for this bank).

For a token t with executed assignments (t, k) to experts e_k with combine weights w_k (the router's
probabilities, ``stgc.moe.routers.mole``), every projection P of the FFN (SwiGLU: gate, up, down;
GELU: fc1, fc2) becomes

    P_t(v) = P(v) + sum_k w_k * s * B_{P,e_k} A_{P,e_k} dropout(v),      s = alpha / rank

so y_t = down_t(silu(gate_t(x)) * up_t(x)) (SwiGLU) or fc2_t(gelu_tanh(fc1_t(x))) (GELU). With top-1 (the
default) the chosen delta is scaled by its probability; with top_k = E this is the released code's dense
soft mixture sum_i p_i dW_i v. Padding tokens (no executed assignment) get the dense FFN alone.

The LoRA layers are peft's (``peft.tuners.lora.Linear``): one per projection, holding the frozen dense
projection once as its ``base_layer`` and the E experts as E named adapters ("expert0", ...), with peft's
parameters, initialisation (A Kaiming-uniform, B zero: every delta is 0 at step 0, so the bank computes
its dense parent exactly), dropout and scaling. Its forward is not used, because peft's module structure
does not fit a per-token routed mixture: ``Linear.forward`` adds every active adapter to every row, and its
per-row alternative (``adapter_names``, ``_mixed_batch_forward``) picks one adapter per row by name at
inference only (peft refuses it in training), with no combine weight that could carry the router's
gradient. The mixture above is therefore written here, one line per delta on peft's own modules.

Token gradients for STGC (``stgc.moe.experts.observe``). A LoRA expert has no bias parameter; "an
expert's bias" means two virtual zero biases of the expert, as for a bias-free SwiGLU FFN expert:
- b2 on the expert's output, i.e. added to its down delta's output before the combine weight:
  g2_{t,e} = w_{t,e} * dL/dy_t (dim D);
- b1 at the input of its down delta, i.e. added to the activation a_t the down projection reads (the dense
  down projection and its delta read the same a_t): g1_{t,e} = dL/da_t (dim F), for SwiGLU and GELU alike.
These are the gradients the bank hands the observer (``TokenGradTap``), and the biases ``biases`` (STGC's
`reference` mode) are added at exactly those two places.

Shape legend: as ``stgc.moe.record`` (T tokens, D model dim, F FFN dim, E experts, K top-k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stgc.config import LoRAExpertsConfig, MoEConfig
from stgc.moe.experts.base import ExpertBank, register_experts
from stgc.moe.experts.ffn import FFN_KINDS, act_forward
from stgc.moe.experts.observe import observed_input
from stgc.moe.record import GradObserver, RoutingRecord

PROJECTIONS = {"swiglu": ("gate_proj", "up_proj", "down_proj"), "gelu": ("fc1", "fc2")}
BASE = "base_layer"  # peft's name for the wrapped (frozen) projection


def adapter_name(e: int) -> str:
    return f"expert{e}"


def lora_projection(base: nn.Linear, settings: LoRAExpertsConfig, num_experts: int) -> nn.Module:
    """A peft LoRA layer around ``base`` with one adapter per expert, all of them trainable."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        init_lora_weights=True,
    )
    layer = LoraLinear(base, adapter_name(0), config=config, r=settings.rank, lora_alpha=settings.alpha)
    for e in range(1, num_experts):
        layer.update_layer(adapter_name(e), settings.rank, settings.alpha, config)
    # peft trains the active adapters only: make every expert active
    layer.set_adapter([adapter_name(e) for e in range(num_experts)])
    return layer


@register_experts
class LoRAExperts(ExpertBank):
    """E LoRA experts on one frozen dense FFN (see the module docstring).

    Parameters (state-dict names under the bank): ``<proj>.base_layer.weight`` / ``.bias`` (the dense
    projection, once; training group "mlp"), ``<proj>.lora_A.expert<e>.weight`` (rank x in) and
    ``<proj>.lora_B.expert<e>.weight`` (out x rank) (group "experts").
    """

    name = "lora"

    def __init__(self, moe: MoEConfig, hidden_size: int, intermediate_size: int, ffn: str):
        super().__init__()
        if ffn not in FFN_KINDS:
            raise ValueError(f"ffn={ffn!r} is not supported; valid kinds are {FFN_KINDS}.")
        settings = moe.experts
        assert isinstance(settings, LoRAExpertsConfig), settings
        limit = min(hidden_size, intermediate_size)
        if settings.rank > limit:
            raise ValueError(
                f"moe.experts.rank={settings.rank} is larger than the smallest FFN projection dimension "
                f"{limit} (hidden {hidden_size}, FFN {intermediate_size}): a LoRA delta of that rank is no "
                f"longer low-rank. Use 1 <= moe.experts.rank <= {limit} (LLaVA-MoLE: 16)."
            )
        self.ffn, self.num_experts, self.settings = ffn, moe.num_experts, settings
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        D, F_ = hidden_size, intermediate_size
        shapes = dict(gate_proj=(D, F_), up_proj=(D, F_), down_proj=(F_, D), fc1=(D, F_), fc2=(F_, D))
        for proj in PROJECTIONS[ffn]:
            base = nn.Linear(*shapes[proj], bias=ffn == "gelu")
            base.requires_grad_(False)  # frozen unless a run names the "mlp" group
            self.add_module(proj, lora_projection(base, settings, self.num_experts))

    def parameter_group(self, name: str) -> str:
        return "mlp" if f".{BASE}." in f".{name}" else "experts"

    @torch.no_grad()
    def upcycle(self, mlp: nn.Module) -> None:
        """The dense MLP's projections become the frozen base (stored once); every LoRA delta restarts at
        peft's initialisation (B = 0: the bank computes ``mlp`` exactly)."""
        for proj in PROJECTIONS[self.ffn]:
            dense, layer = getattr(mlp, proj), getattr(self, proj)
            base = layer.base_layer
            base.weight.copy_(dense.weight)
            if base.bias is not None:
                base.bias.copy_(dense.bias)
            for e in range(self.num_experts):
                layer.reset_lora_parameters(adapter_name(e), True)

    # ----------------------------------------------------------------------------------------------------
    @staticmethod
    def delta(layer: nn.Module, e: int, v_ND: Tensor) -> Tensor:
        """Expert ``e``'s LoRA delta of one projection on rows ``v_ND``: s * B_e A_e dropout(v) (peft's
        vanilla LoRA, as ``peft.tuners.lora.Linear.forward`` computes it for one adapter)."""
        name = adapter_name(e)
        lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
        v_ND = v_ND.to(lora_A.weight.dtype)
        return lora_B(lora_A(layer.lora_dropout[name](v_ND))) * layer.scaling[name]

    def _assignments(self, record: RoutingRecord) -> list[tuple[int, Tensor, Tensor]]:
        """(expert, token rows, slots) of the executed assignments, one expert at a time (host syncs: the
        specification, not a fast path)."""
        out = []
        for e in range(self.num_experts):
            t_idx, k_idx = ((record.topk_idx_TK == e) & record.kept_TK).nonzero(as_tuple=True)
            if t_idx.numel():
                out.append((e, t_idx, k_idx))
        return out

    def _project(
        self, proj: str, v_TN: Tensor, record: RoutingRecord, runs: list[tuple[int, Tensor, Tensor]]
    ) -> Tensor:
        """P_t(v_t) = P(v_t) + sum_k w_tk * delta_{e_tk}(v_t) for one projection."""
        layer = getattr(self, proj)
        out = layer.base_layer(v_TN)
        for e, t_idx, k_idx in runs:
            w = record.weights_TK[t_idx, k_idx].to(out.dtype)[:, None]
            out = out.index_add(0, t_idx, self.delta(layer, e, v_TN[t_idx]).to(out.dtype) * w)
        return out

    def forward(
        self,
        x_TD: Tensor,
        record: RoutingRecord,
        observer: GradObserver | None = None,
        biases: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        x_in, tap = observed_input(x_TD, record.logits_TE, observer)
        if tap is not None:
            tap.record = record
        runs = self._assignments(record)
        if self.ffn == "swiglu":
            gate_TF = self._project("gate_proj", x_in, record, runs)
            a_TF = F.silu(gate_TF) * self._project("up_proj", x_in, record, runs)
            down = "down_proj"
        else:
            a_TF = act_forward("gelu", self._project("fc1", x_in, record, runs), self.intermediate_size)
            down = "fc2"
        if biases is not None:
            # every assignment's virtual first bias sits at a_t (the down projection's input)
            a_TF = a_TF + biases[0].sum(1).to(a_TF.dtype)
        layer = getattr(self, down)
        y_TD = layer.base_layer(a_TF)
        for e, t_idx, k_idx in runs:
            o = self.delta(layer, e, a_TF[t_idx]).to(y_TD.dtype)
            if biases is not None:
                o = o + biases[1][t_idx, k_idx]
            if tap is not None:
                tap.watch(torch.full_like(t_idx, e), t_idx, k_idx, a_TF, o, g1_index=(t_idx,))
            y_TD = y_TD.index_add(0, t_idx, o * record.weights_TK[t_idx, k_idx].to(o.dtype)[:, None])
        return y_TD

    def dense(self, x_TD: Tensor):
        raise ValueError(
            "the LoRA expert bank (model.moe.experts.name='lora') cannot run every expert as a separate "
            "output (a dense competition step): its experts are deltas inside one FFN. Use the 'ffn' bank."
        )

    def extra_repr(self) -> str:
        s = self.settings
        return (
            f"E={self.num_experts}, D={self.hidden_size}, F={self.intermediate_size}, ffn={self.ffn}, "
            f"rank={s.rank}, alpha={s.alpha}, dropout={s.dropout}"
        )


__all__ = ["LoRAExperts", "PROJECTIONS", "adapter_name", "lora_projection"]
