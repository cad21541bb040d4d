"""One demo-credibility experiment: the tiny dense stage (optionally with a pretrained vision tower and
other settings), the baseline MoE stage from it, and lmms-eval on the chosen mini tasks. Appends a line to
results/tiny/experiments/results.jsonl.

    python results/tiny/experiments/run_experiment.py '{"name": "c2", "vision_init": "clip.pt",
        "dense": {"epochs": 12.0}, "data": {...}, "tasks": ["stgc_pope_moellava", ...]}'

lm: keyword overrides of the tiny llama text config (hidden_size, num_hidden_layers, ...).
dense_init: a dense LLaVA checkpoint the dense stage starts from (align_pretrain.py writes one).
vision_init: a state dict of a CLIPVisionModel (clip_pretrain.py writes one), loaded into every freshly
built dense LLaVA; dense / moe / data: overrides of the tiny_dense / tiny recipes' sections.
"""

import json
import sys
import time
from pathlib import Path

import torch

spec = json.loads(sys.argv[1])
if spec.get("vision_init"):
    import transformers.models.llava.modeling_llava as modeling_llava

    class PretrainedVision(modeling_llava.LlavaForConditionalGeneration):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            self.model.vision_tower.load_state_dict(torch.load(spec["vision_init"]), strict=True)

    modeling_llava.LlavaForConditionalGeneration = PretrainedVision

if spec.get("lm"):  # language-model size overrides of the tiny llama
    from stgc.backbones import BACKBONES

    BACKBONES["llama"].sizes["tiny"].update(spec["lm"])

from evals import tasks as T  # noqa: E402
from evals.run import evaluate  # noqa: E402
from stgc.recipes import tiny, tiny_dense  # noqa: E402
from stgc.train import train  # noqa: E402

root = Path("runs/exp") / spec["name"]
dense = tiny_dense()
dense = dense.replace(
    training=dense.training.replace(**spec.get("dense", {})),
    data=dense.data.replace(**spec.get("data", {})),
    model=dense.model.replace(init=spec.get("dense_init", dense.model.init)),
    output_dir=str(root / "dense"),
)
t0 = time.time()
dense_checkpoint = train(dense)
t1 = time.time()
moe = tiny()
moe = moe.replace(
    model=moe.model.replace(init=str(dense_checkpoint)),
    training=moe.training.replace(**spec.get("moe", {})),
    data=moe.data.replace(**spec.get("data", {})),
    output_dir=str(root / "baseline"),
)
moe_checkpoint = train(moe)
t2 = time.time()
scores = {}
for task in spec.get("tasks", T.SUITES[T.MOE_LLAVA]):
    result = evaluate(moe_checkpoint, [task], out_dir=root / "eval" / task, batch_size=16)
    scores[task.replace("stgc_", "")] = round(result.results["results"][task][T.HEADLINE[task] + ",none"], 3)
line = {"name": spec["name"], "dense_s": round(t1 - t0), "moe_s": round(t2 - t1), **scores, "spec": spec}
print(json.dumps(line))
with open(Path(__file__).with_name("results.jsonl"), "a") as f:
    f.write(json.dumps(line) + "\n")
