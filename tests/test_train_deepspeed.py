"""DeepSpeed ZeRO-2 through the Trainer on CPU (one process, gloo / DeepSpeed's CPU accelerator).

Runs in a subprocess: DeepSpeed initialises torch.distributed for the whole process. The first run on a
machine compiles a small op (~25 s, cached under TORCH_EXTENSIONS_DIR); later runs take ~15 s.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
import torch
from stgc.callbacks import StopAtStepCallback
from stgc.recipes import RunConfig, TrainingConfig, stgc_variant
from stgc.train import RunComponents, train
from tests.toy_moe import ToySequences, toy_model

def components(config):
    return RunComponents(toy_model("swiglu", num_layers=2, dtype=torch.float32), ToySequences(48), None)

out = sys.argv[1]
config = stgc_variant(
    RunConfig(
        name="toy",
        training=TrainingConfig(
            lr=1e-2, max_steps=4, batch_size=4, grad_accum=2, save_steps=2, trainable="all",
            deepspeed="configs/deepspeed_zero2.json",
        ),
        output_dir=out,
    ),
    beta=0.5,
)
if sys.argv[2] == "cut":
    print("PARTIAL", train(config, components=components, callbacks=[StopAtStepCallback(2)]))
print("FINAL", train(config, components=components))
# a gloo group left open at exit can abort the interpreter ("terminate called without an active exception")
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, mode: str) -> str:
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        PYTHONPATH=str(REPO),
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out), mode],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_deepspeed_zero2_trains_and_resumes_on_cpu(tmp_path):
    full = _run(tmp_path / "full", "full")
    cut = _run(tmp_path / "cut", "cut")
    assert f"FINAL {tmp_path / 'full' / 'checkpoint-4'}" in full
    assert f"PARTIAL {tmp_path / 'cut' / 'checkpoint-2'}" in cut and "FINAL" in cut
    ckpt = tmp_path / "cut" / "checkpoint-4"
    assert (ckpt / "global_step4").is_dir()  # DeepSpeed's own engine / ZeRO optimizer state
    assert (
        json.loads((ckpt / "run_config.json").read_text())["training"]["deepspeed"]
        == "configs/deepspeed_zero2.json"
    )
    a, b = (
        load_file(str(tmp_path / "full" / "checkpoint-4" / "model.safetensors")),
        load_file(str(ckpt / "model.safetensors")),
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    metrics = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all("conflict/fraction" in m for m in metrics)
