"""The FFN expert bank: E full copies of the dense FFN (sparse upcycling; MoE-LLaVA's experts), and its
eager forward, the readable specification of what the fused path (``stgc.moe.fused``) computes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stgc.config import MoEConfig
from stgc.moe.experts.base import ExpertBank, register_experts
from stgc.moe.experts.observe import observed_input
from stgc.moe.record import GradObserver, RoutingRecord

FFN_KINDS = ("swiglu", "gelu")


def act_forward(ffn: str, h: Tensor, F_: int) -> Tensor:
    """SwiGLU: silu(gate) * up of h = [gate | up]; GELU: tanh-approximated GELU (Phi-2's ``gelu_new``)."""
    if ffn == "swiglu":
        return F.silu(h[..., :F_]) * h[..., F_:]
    return F.gelu(h, approximate="tanh")


@dataclass
class DenseOutputs:
    """Every expert on every token: outputs_TED (before any combine weight) and the activations the first
    bias is added to, site1_TEF (what the token gradients g2 and g1 are taken at)."""

    outputs_TED: Tensor
    site1_TEF: Tensor


@register_experts
class FFNExperts(ExpertBank):
    """E FFN experts stored as stacked weights.

    swiglu (Llama, Qwen2, StableLM; no biases): w_in_EHD = [gate; up] (H = 2F), w_out_EDF.
        y = W_out (silu(W_gate x) * (W_up x)); the first bias is virtual, at the input of W_out.
    gelu (Phi-2; biases): w_in_EHD (H = F), b_in_EH, w_out_EDF, b_out_ED.
        y = W_out gelu_tanh(W_in x + b_in) + b_out; the first bias is b_in (pre-activation).
    """

    name = "ffn"

    def __init__(self, moe: MoEConfig, hidden_size: int, intermediate_size: int, ffn: str):
        super().__init__()
        if ffn not in FFN_KINDS:
            raise ValueError(f"ffn={ffn!r} is not supported; valid kinds are {FFN_KINDS}.")
        num_experts = moe.num_experts
        self.ffn, self.num_experts = ffn, num_experts
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        H = 2 * intermediate_size if ffn == "swiglu" else intermediate_size
        self.w_in = nn.Parameter(torch.empty(num_experts, H, hidden_size))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        if ffn == "gelu":
            self.b_in = nn.Parameter(torch.zeros(num_experts, intermediate_size))
            self.b_out = nn.Parameter(torch.zeros(num_experts, hidden_size))
        else:
            self.register_parameter("b_in", None)
            self.register_parameter("b_out", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w_in, self.w_out):
            nn.init.kaiming_uniform_(w.view(-1, w.shape[-1]), a=math.sqrt(5))
        if self.b_in is not None:
            nn.init.zeros_(self.b_in)
            nn.init.zeros_(self.b_out)

    @torch.no_grad()
    def upcycle(self, mlp: nn.Module) -> None:
        """Every expert a copy of the dense MLP ``mlp`` (gate/up/down or fc1/fc2, nn.Linear layout)."""
        if self.ffn == "swiglu":
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0)
            self.w_in.copy_(gate_up.expand_as(self.w_in))
            self.w_out.copy_(mlp.down_proj.weight.expand_as(self.w_out))
        else:
            self.w_in.copy_(mlp.fc1.weight.expand_as(self.w_in))
            self.b_in.copy_(mlp.fc1.bias.expand_as(self.b_in))
            self.w_out.copy_(mlp.fc2.weight.expand_as(self.w_out))
            self.b_out.copy_(mlp.fc2.bias.expand_as(self.b_out))

    def expert(self, e: int, x_ND: Tensor, bias1_NF: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Expert ``e`` on rows ``x_ND``: (output o_ND, the first-bias activation site1_NF), with an
        explicit first bias added where the real (GELU) or virtual (SwiGLU) one sits."""
        b_in = None if self.b_in is None else self.b_in[e]
        b_out = None if self.b_out is None else self.b_out[e]
        h = F.linear(x_ND, self.w_in[e], b_in)
        if self.ffn == "gelu" and bias1_NF is not None:
            h = h + bias1_NF
        a = act_forward(self.ffn, h, self.intermediate_size)
        if self.ffn == "swiglu" and bias1_NF is not None:
            a = a + bias1_NF
        return F.linear(a, self.w_out[e], b_out), (a if self.ffn == "swiglu" else h)

    def forward(
        self,
        x_TD: Tensor,
        record: RoutingRecord,
        observer: GradObserver | None = None,
        biases: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """One expert at a time over its executed (token, slot) assignments (host syncs: this is the
        specification, not the fast path)."""
        x_in, tap = observed_input(x_TD, record.logits_TE, observer)
        if tap is not None:
            tap.record = record
        y_TD = torch.zeros_like(x_TD)
        runs_TK = record.kept_TK
        for e in range(self.num_experts):
            t_idx, k_idx = ((record.topk_idx_TK == e) & runs_TK).nonzero(as_tuple=True)
            if t_idx.numel() == 0:
                continue
            bias1 = None if biases is None else biases[0][t_idx, k_idx]
            o, site1 = self.expert(e, x_in[t_idx], bias1)
            if biases is not None:
                o = o + biases[1][t_idx, k_idx]
            if tap is not None:
                tap.watch(torch.full_like(t_idx, e), t_idx, k_idx, site1, o)
            y_TD = y_TD.index_add(0, t_idx, o * record.weights_TK[t_idx, k_idx].to(o.dtype)[:, None])
        return y_TD

    def dense(self, x_TD: Tensor) -> DenseOutputs:
        """Every expert on every token (one product per expert), its first-bias activations as one (T, E, F)
        tensor on the path to the outputs (so that a hook on it sees their gradient)."""
        E, b_in, b_out = self.num_experts, self.b_in, self.b_out
        h_TEH = torch.stack(
            [F.linear(x_TD, self.w_in[e], None if b_in is None else b_in[e]) for e in range(E)], 1
        )
        a_TEF = act_forward(self.ffn, h_TEH, self.intermediate_size)
        o_TED = torch.stack(
            [F.linear(a_TEF[:, e], self.w_out[e], None if b_out is None else b_out[e]) for e in range(E)], 1
        )
        return DenseOutputs(o_TED, a_TEF if self.ffn == "swiglu" else h_TEH)

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, D={self.hidden_size}, F={self.intermediate_size}, ffn={self.ffn}"
