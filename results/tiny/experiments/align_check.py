"""Round 5: how well ``model.projector_init=align`` fits the projector (``stgc.lm_stage.align_projector``,
its defaults: 300 steps of 64 scenes) between the demo's stage-0 tower and a language model's embeddings.

LM is a stage-L folder (``stgc pretrain-lm``) or ``random`` (a freshly initialised tiny llama, seed 0: its
embeddings are the targets). Prints the held-out figures and the seconds (2 threads).

    python results/tiny/experiments/align_check.py data/mini/tokenizer runs/tiny/vision-tiny LM
"""

import sys
import time

import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from stgc.lm_stage import align_projector, load_language_model
from stgc.modeling import build_llava_config
from stgc.vision_stage import load_vision_tower

torch.set_num_threads(2)
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = dict(image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
model = LlavaForConditionalGeneration(build_llava_config("llama", "tiny", vocab_size=len(tok), **ids))
load_vision_tower(model, sys.argv[2])
if sys.argv[3] != "random":
    load_language_model(model, sys.argv[3], tok)
t0 = time.perf_counter()
print(align_projector(model, tok), f"{time.perf_counter() - t0:.1f} s")
