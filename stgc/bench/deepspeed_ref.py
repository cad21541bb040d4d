"""DeepSpeed's MoE layer (``deepspeed.moe.layer.MoE``) holding the weights of a ``stgc.moe.MoEBlock``:
the reference MoE-LLaVA trains with, for the equivalence tests (STYLE.md 4) and the speed benchmark.

DeepSpeed's layer needs a process group even on one device; ``single_process_group`` sets up a world of
size 1 (gloo on CPU, nccl on CUDA) and removes it afterwards.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import socket
from collections.abc import Iterator
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from stgc.moe import MoEBlock

# MoE-LLaVA's settings (its train script passes --num_experts 4 --top_k_experts 2 --capacity_factor 1.5;
# ModelArguments defaults eval_capacity_factor 2.0, min_capacity 0, use_residual False; the DeepSpeed MoE
# defaults it keeps: drop_tokens True, use_rts True, noisy_gate_policy None, and the Gumbel-sampled 2nd
# expert of DeepSpeed's top-2 gate, which top2_2nd_expert_sampling=True reproduces).
MOELLAVA_DS_SETTINGS = dict(
    k=2,
    capacity_factor=1.5,
    eval_capacity_factor=2.0,
    min_capacity=0,
    drop_tokens=True,
    top2_2nd_expert_sampling=True,
    use_residual=False,
)


class SwiGLUExpert(nn.Module):
    """A Llama/StableLM/Qwen2 MLP (gate/up/down, no biases), as DeepSpeed's ``Experts`` deep-copies it."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluExpert(nn.Module):
    """A Phi MLP (fc1 -> tanh-GELU -> fc2, with biases)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_process_group(backend: str | None = None) -> Iterator[None]:
    """A torch.distributed world of size 1 plus DeepSpeed's communication backend on top of it.

    DeepSpeed's own ``init_distributed`` on a CPU first compiles a shared-memory all-reduce op (~45 s on
    2 cores) that a world of one never uses, so its ``TorchBackend`` is built here with that op disabled.
    Everything created here (process group, DeepSpeed backend, expert-parallel groups) is removed on exit.
    """
    from deepspeed.utils import groups

    # ``deepspeed.comm`` re-exports the torch package under the name ``torch``: import the modules by path.
    ds_comm = importlib.import_module("deepspeed.comm.comm")
    ds_torch = importlib.import_module("deepspeed.comm.torch")

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    previous_cdb = ds_comm.cdb
    if ds_comm.cdb is None:
        with mock.patch.object(ds_torch, "build_shm_op", lambda: None):
            ds_comm.cdb = ds_torch.TorchBackend(backend, datetime.timedelta(minutes=5), None)
    saved = {
        name: dict(getattr(groups, name))
        for name in (
            "_EXPERT_PARALLEL_GROUP",
            "_EXPERT_PARALLEL_GROUP_RANKS",
            "_EXPERT_DATA_PARALLEL_GROUP",
            "_EXPERT_DATA_PARALLEL_GROUP_RANKS",
        )
    }
    try:
        yield
    finally:
        for name, value in saved.items():
            getattr(groups, name).clear()
            getattr(groups, name).update(value)
        ds_comm.cdb = previous_cdb
        if created:
            dist.destroy_process_group()


def deepspeed_moe_from_block(
    block: MoEBlock,
    *,
    k: int | None = None,
    capacity_factor: float = 1.0,
    eval_capacity_factor: float | None = None,
    min_capacity: int = 0,
    drop_tokens: bool = False,
    top2_2nd_expert_sampling: bool = False,
    use_residual: bool = False,
) -> nn.Module:
    """``deepspeed.moe.layer.MoE`` with the router and expert weights of ``block`` (copies, same dtypes).

    Call inside ``single_process_group()``. The gate weight stays fp32 as DeepSpeed creates it.
    """
    from deepspeed.moe.layer import MoE

    bank = block.experts
    D, F_, E = bank.hidden_size, bank.intermediate_size, bank.num_experts
    template = SwiGLUExpert(D, F_) if bank.ffn == "swiglu" else GeluExpert(D, F_)
    layer = MoE(
        D,
        template,
        num_experts=E,
        ep_size=1,
        k=block.config.top_k if k is None else k,
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor if eval_capacity_factor is None else eval_capacity_factor,
        min_capacity=min_capacity,
        use_residual=use_residual,
        drop_tokens=drop_tokens,
        use_rts=False,
        top2_2nd_expert_sampling=top2_2nd_expert_sampling,
    )
    layer.set_deepspeed_parallelism()
    layer.to(device=bank.w_in.device, dtype=bank.w_in.dtype)
    with torch.no_grad():
        gate = layer.deepspeed_moe.gate.wg
        gate.float()
        gate.weight.copy_(block.router.weight.float())
        for e, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            if bank.ffn == "swiglu":
                expert.gate_proj.weight.copy_(bank.w_in[e, :F_])
                expert.up_proj.weight.copy_(bank.w_in[e, F_:])
                expert.down_proj.weight.copy_(bank.w_out[e])
            else:
                expert.fc1.weight.copy_(bank.w_in[e])
                expert.fc1.bias.copy_(bank.b_in[e])
                expert.fc2.weight.copy_(bank.w_out[e])
                expert.fc2.bias.copy_(bank.b_out[e])
    return layer


def expert_grads_as_bank(layer: nn.Module, ffn: str) -> dict[str, Tensor]:
    """The DeepSpeed layer's expert gradients in ``ExpertBank`` layout (w_in_EHD, w_out_EDF, biases)."""
    experts = layer.deepspeed_moe.experts.deepspeed_experts
    if ffn == "swiglu":
        return {
            "w_in": torch.stack(
                [torch.cat([x.gate_proj.weight.grad, x.up_proj.weight.grad]) for x in experts]
            ),
            "w_out": torch.stack([x.down_proj.weight.grad for x in experts]),
        }
    return {
        "w_in": torch.stack([x.fc1.weight.grad for x in experts]),
        "b_in": torch.stack([x.fc1.bias.grad for x in experts]),
        "w_out": torch.stack([x.fc2.weight.grad for x in experts]),
        "b_out": torch.stack([x.fc2.bias.grad for x in experts]),
    }
